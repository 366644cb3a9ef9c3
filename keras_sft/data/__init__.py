"""Data: from a dataset name to tf.data pipelines.

- `pipeline`: `from_config(config)`, the one wiring of a run's data (tfds
  or folder, train stream, eval set), and `create_datasets` for library use.
- `augment`: per-image augmentations (one entry each) and the eval view.
- `batch_augment`: MixUp, CutMix and RandAugment on batches (one entry each).
- `folders`: `folder:PATH` datasets (layout, splits, corrupt-file checks).
- `images`: decoding image bytes the same way for training and serving.
"""
