"""Exports of a run, and `python -m keras_sft.export` (`__main__`).

- `formats`: the table of export formats (one entry each: file, packages,
  write, load, metadata) and `export_run`.
- `saved_model`: TF Serving's SavedModel, loadable without keras_sft.
- `onnx`, `litert`: the other formats' entries.
- `restore`: a run's model restored from its checkpoint for export.
- `versions`: numbered export versions, written atomically.
"""
