"""The workdir is the run: it holds the resolved config and refuses another.

Layout:
  config.json      the resolved config of the run (written on first start)
  train.log        log lines of every start of the run
  checkpoints/     atomic backups, resumed from on a rerun
  history.csv      per-epoch metrics; tensorboard/ the same for TensorBoard
  dataset.json     dataset name and class names (read by the export)
  metrics.json     final evaluation, with the report of keras_sft.evaluation
  confusion_matrix.png, curves.png   the report's pictures
  export/<n>/      SavedModels for TF Serving, versions 1, 2, ...
"""

import json
import os

CONFIG_FILE = 'config.json'
_ABSENT = '<absent>'


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_to_dict(config):
  """Returns a JSON-safe dict of a ConfigDict (or dict)."""
  as_dict = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  return json.loads(json.dumps(as_dict, default=str))


def prepare(workdir, config, write=True):
  """Creates `workdir` for `config`, or checks it holds this same run.

  Args:
    workdir: The run directory.
    config: The resolved ConfigDict.
    write: False on the workers of a multi-worker run other than the chief:
      they check the config the chief wrote, if any, and write nothing.

  Raises:
    ValueError: `workdir` holds a run with a different config.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if write:
    os.makedirs(workdir, exist_ok=True)
  current = config_to_dict(config)
  if os.path.exists(path):
    with open(path) as file:
      previous = json.load(file)
    if previous != current:
      old, new = _flatten(previous), _flatten(current)
      differences = [
          f'{key}: {old.get(key, _ABSENT)!r} in the workdir, '
          f'{new.get(key, _ABSENT)!r} now'
          for key in sorted(set(old) | set(new))
          if old.get(key, _ABSENT) != new.get(key, _ABSENT)
      ]
      raise ValueError(
          f'workdir={workdir!r} holds another run; its config differs in: '
          + '; '.join(differences) +
          '. Use a new --workdir, or rerun with the same config to resume.')
    return
  if not write:
    return
  write_json(path, current)


def atomic_write(path, data):
  """Writes `data` (str or bytes) to `path` via a flushed temporary file.

  A process killed at any moment leaves the old file or the new one, never
  a torn one.
  """
  temporary = path + '.tmp'
  with open(temporary, 'wb' if isinstance(data, bytes) else 'w') as file:
    file.write(data)
    file.flush()
    os.fsync(file.fileno())
  os.replace(temporary, path)


def write_json(path, value):
  """Atomically writes `value` as indented JSON with sorted keys."""
  atomic_write(path, json.dumps(value, indent=2, sort_keys=True))
