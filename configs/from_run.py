r"""The exact config of an existing run, from its `config.json`.

Reruns a run (a tuning trial, say) as an ordinary run elsewhere:

    python -m keras_sft.main \
        --config=configs/from_run.py:DIR/trials/3/config.json --workdir=NEW

Overrides work as with any config (`--config.num_epochs=5`).
"""

import os

from configs import default as default_lib
from keras_sft import files
from keras_sft import workdir as workdir_lib


def get_config(path):
  """The default config with every value of the run's `config.json`."""
  config = default_lib.get_config()
  values = workdir_lib.with_keys_added_later(
      files.read_json_object(path))
  # A self-training run's config.json is its last student's (its epochs and
  # noise); the run's own config, but for the keys its stages check
  # themselves (taken from the student, which keeps them), is the claim of
  # its self_training/ directory.
  own = os.path.join(os.path.dirname(path), 'self_training', 'config.json')
  if values.get('semi_supervised') == 'self_training' and os.path.exists(own):
    # Its keys alone: the stage keys it lacks are the student's, not
    # KEYS_ADDED_LATER's older values.
    values.update(files.read_json_object(own))
  unknown = sorted(set(values) - set(config.keys()))
  if unknown:
    raise ValueError(f'{path} holds keys this keras-sft does not know: '
                     f'{unknown}. Use the keras-sft version that wrote it.')
  for key, value in values.items():
    if isinstance(config[key], tuple) and isinstance(value, list):
      value = tuple(value)  # JSON has no tuples.
    config[key] = value
  return config
