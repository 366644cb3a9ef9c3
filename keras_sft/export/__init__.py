"""Exports of a run, and `python -m keras_sft.export` (`__main__`).

- `formats`: the table of export formats (one `Format` entry each: file,
  packages, saver, loader, metadata) and `export_run`.
- `saved_model`: TF Serving's SavedModel, loadable without keras_sft, and
  `write_version`, the atomic versioned writer of every format.
- `graph`: the fixed-size uint8 graph the converted formats take.
- `onnx_format`, `litert_format`: the ONNX and LiteRT (float, int8) entries.
- `restore`: a run's model rebuilt from its checkpoint, and which weights
  an export holds (`weights_source`).
- `packages`: a format's optional packages, by extra.
"""
