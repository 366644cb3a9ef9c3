"""Per-image augmentations (one entry each) and the eval view of an image.

Training images get the entries of `AUGMENTATIONS`, in order, each switched
by its config key (default on) and seeded by its own share of the example's
seed; evaluation and serving get `preprocess_for_eval`. Adding an
augmentation is one entry (its key in configs/default.py, its function) plus
its tests: `pipeline.from_config` passes every entry's key through.
"""

import dataclasses
from typing import Callable, Optional

import tensorflow as tf

# ImageNet-style resize-and-crop keeps this fraction of the resized image.
CROP_FRACTION = 0.875
# CIFAR-style pad-and-crop pads this fraction of the side on each edge
# (4 pixels at 32px, as in He et al. 2016).
PAD_FRACTION = 0.125


@dataclasses.dataclass(frozen=True)
class View:
  """The output geometry: side `image_size`, optional `resize_size`."""
  image_size: int
  resize_size: Optional[int] = None


def _resize(image, image_size):
  return tf.image.resize(image, [image_size, image_size], antialias=True)


def augment_for_training(image, image_size, seed, resize_size=None,
                         **switches):
  """Random crop and horizontal flip of one image, as float32 in [0, 255].

  Images whose side equals `image_size` are padded by 12.5% on each edge with
  zeros and cropped back (the CIFAR recipe). Other images are resized so the
  crop keeps 87.5% of the side, then cropped (the ImageNet recipe). With
  `resize_size`, every image is resized to that side and then cropped
  (BiT-HyperRule: 160 then 128, or 448 then 384).

  Args:
    image: `[H, W, 3]` uint8 or float image.
    image_size: Side of the output square.
    seed: Shape `[2]` int tensor for the stateless random ops.
    resize_size: None, or the side every image is resized to before the crop
      (>= image_size).
    **switches: One bool per `AUGMENTATIONS` key (`random_crop`,
      `random_flip`), default True. random_crop=False: no crop at a random
      position; the image gets the eval geometry (`preprocess_for_eval`)
      instead. random_flip=False: no horizontal flip.

  Returns:
    `[image_size, image_size, 3]` float32 image.
  """
  unknown = set(switches) - {entry.key for entry in AUGMENTATIONS}
  if unknown:
    raise ValueError(f'Unknown augmentations {sorted(unknown)}; known: '
                     f'{[entry.key for entry in AUGMENTATIONS]}.')
  view = View(image_size, resize_size)
  image = tf.cast(image, tf.float32)
  # One seed per entry, split once: splitting into more seeds leaves the
  # first ones unchanged (Philox fills them first), so an entry appended to
  # AUGMENTATIONS leaves the others' randomness, and resumed runs, as they
  # were (tested).
  seeds = tf.unstack(tf.random.experimental.stateless_split(
      seed, num=len(AUGMENTATIONS)))
  for entry, entry_seed in zip(AUGMENTATIONS, seeds):
    if switches.get(entry.key, True):
      image = entry.apply(image, entry_seed, view)
    elif entry.otherwise is not None:
      image = entry.otherwise(image, view)
  return image


def _random_crop(image, seed, view):
  """Pad-and-crop (side image_size) or resize-and-crop; see the caller."""
  image_size, resize_size = view.image_size, view.resize_size
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  native = tf.logical_and(tf.equal(height, image_size),
                          tf.equal(width, image_size))
  pad = int(round(image_size * PAD_FRACTION))
  enlarged = int(round(image_size / CROP_FRACTION))
  if resize_size:
    native = tf.constant(False)
    enlarged = resize_size
  image = tf.cond(
      native,
      lambda: tf.pad(image, [[pad, pad], [pad, pad], [0, 0]]),
      lambda: tf.image.resize(image, [enlarged, enlarged], antialias=True))
  return tf.image.stateless_random_crop(
      image, [image_size, image_size, 3], seed=seed)


def stored_side(image_size, resize_size=None):
  """The short side large images are cached at: twice what is resized to.

  Training resizes to image_size / 0.875 (or resize_size) before its crop,
  evaluation to at most that; keeping twice as many pixels per side leaves
  the later antialiased resize with what it needs (measured on smooth
  300x450 to 3000x2000 images: outputs within 0.7 of 255 on average of
  those from the full-resolution image).
  """
  return 2 * max(int(round(image_size / CROP_FRACTION)), resize_size or 0)


def shrink(image, short_side):
  """Downscales `image`, aspect kept, so its short side is `short_side`.

  Images whose short side is not longer are returned unchanged (so a
  CIFAR-sized image keeps its exact pixels and its pad-and-crop). A uint8
  image stays uint8 (rounded): it is what gets cached, so a folder of
  8000x8000 photos is not kept at 192 MB an image.
  """
  static = image.shape[:2]
  if static.is_fully_defined() and min(static) <= short_side:
    return image
  size = tf.shape(image)[:2]
  shortest = tf.reduce_min(size)

  def shrink():
    scale = short_side / tf.cast(shortest, tf.float64)
    new_size = tf.cast(tf.round(tf.cast(size, tf.float64) * scale), tf.int32)
    resized = tf.image.resize(image, tf.maximum(new_size, 1), antialias=True)
    if image.dtype.is_integer:
      resized = tf.clip_by_value(tf.round(resized), image.dtype.min,
                                 image.dtype.max)
    return tf.cast(resized, image.dtype)

  shrunk = tf.cond(shortest > short_side, shrink, lambda: image)
  shrunk.set_shape([None, None, image.shape[-1]])
  return shrunk


def preprocess_for_eval(image, image_size, resize_size=None):
  """The eval (and serving) view of an image, at the scale training sees.

  Images of side `image_size` pass unchanged (training pads and crops them
  at their own scale). Others are resized to `image_size / 0.875`, squashed
  to a square as `augment_for_training` does, and centre-cropped to
  `image_size`, so objects look as large as in the training crops. With
  `resize_size` (BiT-HyperRule), images are resized to `image_size`
  directly, BiT's published eval rule.

  Args:
    image: `[H, W, 3]` or a batch `[N, H, W, 3]`, uint8 or float.
    image_size: Side of the output square.
    resize_size: None, or the training `resize_size` (see
      `augment_for_training`).

  Returns:
    float32 in [0, 255], `[image_size, image_size, 3]` (or batched).
  """
  image = tf.cast(image, tf.float32)
  if resize_size:
    return _resize(image, image_size)
  enlarged = int(round(image_size / CROP_FRACTION))
  offset = (enlarged - image_size) // 2

  def resize_and_crop():
    resized = _resize(image, enlarged)
    return resized[..., offset:offset + image_size,
                   offset:offset + image_size, :]

  shape = tf.shape(image)
  native = tf.logical_and(tf.equal(shape[-3], image_size),
                          tf.equal(shape[-2], image_size))
  output = tf.cond(native, lambda: image, resize_and_crop)
  output.set_shape(image.shape[:-3].concatenate(
      [image_size, image_size, image.shape[-1]]))
  return output


def _flip(image, seed, view):
  del view
  return tf.image.stateless_random_flip_left_right(image, seed=seed)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """One per-image augmentation of training images.

  Attributes:
    key: Its config key (a bool, default True).
    apply: `apply(float32 image, seed [2], View)` → the augmented image.
    otherwise: `otherwise(image, View)` when switched off; None: unchanged.
  """
  key: str
  apply: Callable
  otherwise: Optional[Callable] = None


# In order of application. Append new entries at the end (see
# `augment_for_training` on seeds).
AUGMENTATIONS = (
    # Off: the eval view (centre crop), so the output has its geometry.
    Augmentation('random_crop', _random_crop,
                 otherwise=lambda image, view: preprocess_for_eval(
                     image, view.image_size, view.resize_size)),
    Augmentation('random_flip', _flip),
)


def switches_from_config(config):
  """`{key: bool}` of every `AUGMENTATIONS` entry, from the config."""
  return {entry.key: bool(config[entry.key]) for entry in AUGMENTATIONS}
