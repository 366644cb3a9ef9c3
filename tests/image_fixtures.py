"""Small image folders written by the tests themselves, with PIL.

`write_image_folder(root)` writes

    root/train/cat/  RGB PNGs, 32x32
    root/train/dog/  RGB JPEGs of mixed sizes
    root/train/owl/  a grayscale PNG, an RGBA PNG, a grayscale JPEG, RGB PNGs
    root/test/<same classes>/

and returns what it wrote, so tests compute their expectations from the
fixture rather than from the code under test.
"""

import os

import numpy as np
from PIL import Image

CLASSES = ('cat', 'dog', 'owl')
# Images per class and split.
COUNTS = {'train': 4, 'test': 2}
# Sides of the dog JPEGs, cycled: mixed sizes, not all square.
_DOG_SIZES = ((32, 32), (48, 40), (20, 28), (64, 64))


def _pixels(rng, height, width, channels):
  shape = (height, width) if channels == 1 else (height, width, channels)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def write_image_folder(root, seed=0, counts=None):
  """Writes the folder; returns `{relative path: (label, RGB array or None)}`.

  The array is the exact RGB content expected after decoding for lossless
  PNGs (grayscale replicated, alpha dropped) and None for JPEGs.
  """
  counts = counts or COUNTS
  rng = np.random.default_rng(seed)
  written = {}
  for split, count in counts.items():
    for label, name in enumerate(CLASSES):
      directory = os.path.join(root, split, name)
      os.makedirs(directory, exist_ok=True)
      for i in range(count):
        if name == 'cat':
          pixels = _pixels(rng, 32, 32, 3)
          relative = f'{split}/{name}/{i}.png'
          Image.fromarray(pixels).save(os.path.join(root, relative))
          expected = pixels
        elif name == 'dog':
          height, width = _DOG_SIZES[i % len(_DOG_SIZES)]
          relative = f'{split}/{name}/{i}.jpg'
          Image.fromarray(_pixels(rng, height, width, 3)).save(
              os.path.join(root, relative), quality=90)
          expected = None
        elif i == 0:
          gray = _pixels(rng, 30, 30, 1)
          relative = f'{split}/{name}/gray.png'
          Image.fromarray(gray, mode='L').save(os.path.join(root, relative))
          expected = np.repeat(gray[..., None], 3, axis=-1)
        elif i == 1:
          rgba = _pixels(rng, 32, 24, 4)
          relative = f'{split}/{name}/rgba.png'
          Image.fromarray(rgba, mode='RGBA').save(os.path.join(root, relative))
          expected = rgba[..., :3]
        elif i == 2:
          relative = f'{split}/{name}/gray.jpeg'
          Image.fromarray(_pixels(rng, 36, 36, 1), mode='L').save(
              os.path.join(root, relative))
          expected = None
        else:
          pixels = _pixels(rng, 32, 32, 3)
          relative = f'{split}/{name}/{i}.png'
          Image.fromarray(pixels).save(os.path.join(root, relative))
          expected = pixels
        written[relative] = (label, expected)
  return written


def write_corrupt(path):
  """Writes a file with an image extension that no decoder accepts."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as file:
    file.write(b'\x89PNG\r\n\x1a\n but then not a PNG at all')


def write_truncated_jpeg(path, seed=1):
  """Writes the first half of a valid JPEG."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(_pixels(rng, 32, 32, 3)).save(path, format='JPEG')
  with open(path, 'rb') as file:
    data = file.read()
  with open(path, 'wb') as file:
    file.write(data[:len(data) // 2])


def png_bomb(side=16_000):
  """A valid grayscale PNG of `side` x `side` zeros, ~250 KB at 16000.

  Written chunk by chunk with zlib, so making it never holds the pixels.
  """
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind, payload):
    return (struct.pack('>I', len(payload)) + kind + payload +
            struct.pack('>I', zlib.crc32(kind + payload)))

  compressor = zlib.compressobj(9)
  row = bytes(side + 1)  # Filter byte 0, then the row's zero pixels.
  rows_per_piece = max(1, (1 << 24) // len(row))
  pieces = []
  for start in range(0, side, rows_per_piece):
    pieces.append(compressor.compress(row * min(rows_per_piece,
                                                side - start)))
  pieces.append(compressor.flush())
  header = struct.pack('>IIBBBBB', side, side, 8, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) +
          chunk(b'IDAT', b''.join(pieces)) + chunk(b'IEND', b''))
