"""Which data a trial sees: selection never reads the test split.

Trials train on the training split minus a held-out validation part and are
scored on that part; the config's `eval_split` (the test split) is read only
by the final run, after the search:

- image folders: `validation_fraction` holds out a fixed fraction of each
  class of `train_split` (`folders.hold_out`: the same files whatever
  the seed), and `eval_split` is then not even listed;
- tfds: `train_split='train[:90%]'`, `eval_split='train[90%:]'`.
"""

from keras_sft import errors
from keras_sft.data import folders


def check(config, validation_fraction):
  """Refuses configs whose validation split cannot be carved cleanly.

  Raises:
    ConfigError: the fraction is outside (0, 1), the config already holds out
      a validation part (its eval would then be the trials' validation data)
      or a tfds train split is already sliced.
  """
  if not (errors.is_number(validation_fraction) and
          0 < validation_fraction < 1):
    raise errors.ConfigError(
        'validation_fraction must be in (0, 1): the trials are scored on that '
        'fraction of the training data. Received: '
        f'--validation_fraction={validation_fraction!r}')
  if config.validation_fraction:
    raise errors.ConfigError(
        'The study carves its own validation split from train_split and keeps '
        'eval_split as the test split, read once after the search; the config '
        f'sets validation_fraction={config.validation_fraction!r}. Pass '
        '--config.validation_fraction=0 with a test split in eval_split (a '
        'test/ folder), and --validation_fraction for the trials.')
  if (not folders.is_folder_dataset(config.dataset) and
      '[' in config.train_split):
    raise errors.ConfigError(
        'The study slices train_split into training and validation parts, so '
        f'it must be a whole split. Received: train_split='
        f'{config.train_split!r}. Use e.g. --config.train_split=train.')


def _percent(fraction):
  return f'{100 * (1 - fraction):g}%'


def search_config(config, validation_fraction):
  """The config of a trial: trains on the training part, scored on the
  validation part; never exports (the final run does).

  Args:
    config: The study's config with the trial's values.
    validation_fraction: The fraction of the training data held out.
  """
  result = config.copy_and_resolve_references()
  with result.unlocked():
    if folders.is_folder_dataset(config.dataset):
      result.validation_fraction = validation_fraction
    else:
      split = config.train_split
      result.train_split = f'{split}[:{_percent(validation_fraction)}]'
      result.eval_split = f'{split}[{_percent(validation_fraction)}:]'
    result.export = False
  return result


def search_overrides(config, validation_fraction):
  """The `--config.KEY=VALUE` flags that turn `config` into the search
  config (for the command that reruns a trial as an ordinary run)."""
  searched = search_config(config, validation_fraction)
  return {key: searched[key] for key in
          ('validation_fraction', 'train_split', 'eval_split', 'export')
          if searched[key] != config[key]}


def test_split(config):
  """What the final run evaluates on, for messages."""
  if folders.is_folder_dataset(config.dataset):
    return f'{folders.folder_root(config.dataset)}/{config.eval_split}'
  return f'{config.dataset}:{config.eval_split}'
