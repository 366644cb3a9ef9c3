"""Image bytes to pixels, the same way for training folders and serving.

`decode_image` takes JPEG or PNG by content (not by file name), converts
grayscale and RGBA to RGB and 16-bit to 8-bit, and refuses an image of more
than `max_pixels` from its header, before decoding. `find_unreadable` decodes
a list of files once and reports those that fail, with a reason a person can
act on; `error_message` turns TensorFlow's error into that reason.
"""

import re

import numpy as np
import tensorflow as tf

# The default of `config.max_image_pixels`: the most pixels an image may
# have, read from its header before it is decoded (40 MP: 120 MB as uint8
# RGB).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
_JPEG_MAGIC = b'\xff\xd8\xff'
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _hex(data):
  """Bytes as space-separated hex, e.g. '42 4d cf': valid UTF-8 always."""
  digits = tf.constant([f'{byte:02x}' for byte in range(256)])
  byte_values = tf.io.decode_raw(data, tf.uint8)
  return tf.strings.reduce_join(
      tf.gather(digits, tf.cast(byte_values, tf.int32)), separator=' ')


def _other_format(head):
  """' (it is a BMP image: ...)' for formats known by their header, else ''.

  `head(position, length)` returns bytes of the image at that position.
  """
  known = (('BMP', tf.equal(head(0, 2), b'BM')),
           ('GIF', tf.equal(head(0, 4), b'GIF8')),
           ('WebP', tf.logical_and(tf.equal(head(0, 4), b'RIFF'),
                                   tf.equal(head(8, 4), b'WEBP'))),
           ('TIFF', tf.logical_or(tf.equal(head(0, 4), b'II*\0'),
                                  tf.equal(head(0, 4), b'MM\0*'))))
  text = tf.constant('')
  for name, matches in known:
    text = tf.where(matches, f' (it is a {name} image: convert it to PNG or '
                    'JPEG)', text)
  return text


def _header_size(contents, is_jpeg, head):
  """`(width, height)` int64 from a JPEG's or PNG's header, not decoding.

  PNG: the IHDR chunk, which the format puts first (bytes 16-24, big-endian
  width and height); libpng refuses a file without it there, so these are
  the dimensions it would decode. JPEG: libjpeg's own header parser (the
  SOFn marker).
  """
  def jpeg():
    height_width = tf.io.extract_jpeg_shape(contents, output_type=tf.int64)
    return height_width[1], height_width[0]

  def png():
    digits = tf.cast(tf.io.decode_raw(head(16, 8), tf.uint8), tf.int64)
    big_endian = lambda b: ((b[0] * 256 + b[1]) * 256 + b[2]) * 256 + b[3]
    return big_endian(digits[:4]), big_endian(digits[4:])

  return tf.cond(is_jpeg, jpeg, png)


def decode_image(contents, name='image', max_pixels=None):
  """Decodes JPEG or PNG bytes to a uint8 RGB `[H, W, 3]` tensor.

  Only JPEG and PNG are accepted, whatever the file name says: the training
  data and the export's `serve_image_bytes` go through this one function,
  so they accept the same images. Other bytes fail, when run, with an
  InvalidArgumentError `<name> is not a JPEG or PNG image ...` that names a
  recognized format (BMP, GIF, WebP, TIFF) and shows the first bytes in hex.
  With `max_pixels`, the width and height are read from the header first
  and a larger image fails (`<name> is WxH pixels ...`) without being
  decoded: a 250 KB PNG can hold 16000x16000 pixels (768 MB decoded).

  Args:
    contents: A scalar string tensor, the encoded image.
    name: A scalar string (tensor) naming the image in messages: a path, or
      `image_bytes[3]`.
    max_pixels: None, or the most pixels (width x height) decoded.
  """
  padded = tf.strings.join([contents, tf.constant(b'\0' * 24)])
  head = lambda position, length: tf.strings.substr(padded, position, length)
  is_jpeg = tf.equal(head(0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
  is_image = tf.logical_or(is_jpeg,
                           tf.equal(head(0, len(_PNG_MAGIC)), _PNG_MAGIC))
  length = tf.strings.length(contents)
  message = tf.strings.join([
      name, ' is not a JPEG or PNG image', _other_format(head),
      ': it holds ', tf.strings.as_string(length), ' bytes',
      tf.where(length > 0, tf.strings.join([
          ' starting with (hex) ', _hex(tf.strings.substr(contents, 0, 8))]),
               '')])
  checks = [tf.debugging.Assert(is_image, [message])]
  if max_pixels is not None:
    with tf.control_dependencies(checks):
      width, height = _header_size(contents, is_jpeg, head)
    # Each side first: the product of two 32-bit sides can overflow int64.
    small = tf.logical_and(
        tf.logical_and(width <= max_pixels, height <= max_pixels),
        width * height <= max_pixels)
    megapixels = tf.strings.as_string(
        tf.cast(width, tf.float64) * tf.cast(height, tf.float64) / 1e6,
        precision=1)
    message = tf.strings.join([
        name, ' is ', tf.strings.as_string(width), 'x',
        tf.strings.as_string(height), ' pixels (', megapixels,
        f' megapixels), more than max_image_pixels={max_pixels} '
        f'({max_pixels / 1e6:.1f} megapixels); it was not decoded. Use a '
        'smaller image, or a larger --config.max_image_pixels (for an '
        'export: when it is written).'])
    checks.append(tf.debugging.Assert(small, [message]))
  with tf.control_dependencies(checks):
    # channels=3 turns grayscale into RGB and drops an alpha channel;
    # dtype=uint8 scales 16-bit PNGs down.
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8,
                               expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def error_message(error):
  """The one-line reason in the error of a failed `decode_image`.

  Args:
    error: A `tf.errors.OpError` (or the UnicodeDecodeError of exports older
      than the hex message) raised by a graph that ran `decode_image`.
  """
  if isinstance(error, UnicodeDecodeError):
    message = error.object.decode('utf-8', 'backslashreplace')
  else:
    message = error.message
  match = re.search(r'assertion failed: \[(.*?)\]\n', message)
  if match:
    return match.group(1).replace('\\"', '"')
  # A decoder's own error, e.g. "Invalid PNG data, size 160", between
  # lines naming graph nodes, and, from a tf.function called eagerly (not a
  # SavedModel), the Python stack that defined the node (`File "..."`).
  lines = [line.strip() for line in message.splitlines()]
  kept = [line for line in lines if line and not line.startswith(
      ('Graph execution error', 'Detected at node', '<stack traces', '[[',
       'File "'))]
  text = ' '.join(kept) or message
  return re.sub(r'\s*\[Op:[^\]]*\]$', '', text)


def find_unreadable(paths, max_pixels=None):
  """Returns the paths among `paths` that cannot be read or decoded.

  Every file is read and fully decoded in a parallel tf.data map that emits
  its path; `ignore_errors` drops the elements that fail, and the paths that
  do not come out are the unreadable ones. A header check alone would miss
  truncated files. It costs one decode of every file; the training
  pipeline decodes again into its cache.

  Args:
    paths: A sequence of file paths.
    max_pixels: None, or the most pixels an image may have (see
      `decode_image`); larger ones count as unreadable.

  Returns:
    The unreadable paths, in the order of `paths`.
  """
  if not paths:
    return []
  dataset = tf.data.Dataset.from_tensor_slices(np.asarray(paths, dtype=object))

  def check(path):
    image = decode_image(tf.io.read_file(path), path, max_pixels)
    # Emit a value computed from the decoded image: a control dependency
    # alone gets pruned by tf.data's graph optimizations (measured).
    return path, tf.shape(image)

  # Order does not matter here (the result is a set difference), so the
  # parallel map may return elements as soon as they are ready.
  readable = dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=False)
  readable = readable.ignore_errors()
  # Batch so that Python touches few, large elements.
  readable = readable.batch(1024)
  good = set()
  for batch, _ in readable.as_numpy_iterator():
    good.update(path.decode('utf-8') for path in batch)
  return [path for path in paths if path not in good]


def reason(path, max_pixels):
  """Why `path` cannot be decoded, in one line."""
  try:
    _decode_file(tf.constant(path), max_pixels)
  except tf.errors.OpError as error:
    message = error_message(error)
    return message if message.startswith(path) else f'{path}: {message}'
  return f'{path}: not readable when checked, readable now'


@tf.function
def _decode_file(path, max_pixels):
  # A tf.function, so that a failed check has the message of the graph (as
  # in training and serving), not eager mode's.
  return tf.shape(decode_image(tf.io.read_file(path), path, max_pixels))
