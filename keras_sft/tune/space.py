"""Search spaces: which config keys a study varies, and over what.

A space file is a Python file like the configs, whose `get_space()` returns
a dict from config key to a range:

    def get_space():
      return {
          'learning_rate': {'low': 1e-3, 'high': 0.1, 'log': True},
          'head_only_epochs': {'low': 0, 'high': 2},        # an int key: ints
          'freeze_until': {'choices': [None, 'conv2', 'conv4']},
      }

`{'low', 'high'}` (with `log` and `step` optional) is a number range, of
integers for an int key (`step` default 1) and of floats for a float key;
`{'choices': [...]}` picks one of the values (None, bool, int, float or
str). `validate` checks a space against the config before any trial runs:
unknown keys, empty or badly typed ranges, and values the run would refuse
(a `freeze_until` stage the model lacks, `batch_norm='frozen'` for
ConvNeXt, ...) are one `errors.ConfigError` each.
"""

import dataclasses
import difflib
import importlib.util
import itertools
import math
import os

import ml_collections

from keras_sft import errors

# Keys a space may not vary: they pick the data (selection must never touch
# the test split), the trial's budget (the pruner's resource) or what the
# study's workers share.
_FIXED_KEYS = {
    'dataset': 'the data of every trial must be the same',
    'data_dir': 'the data of every trial must be the same',
    'train_split': 'the study carves its validation split from it',
    'eval_split': 'the test split is read once, after the search',
    'validation_fraction': 'set the study\'s --validation_fraction instead',
    'num_epochs': 'it is the most epochs a trial runs (the pruner\'s budget)',
    'eval_every_epochs': 'pruning reads the validation accuracy every epoch',
    'export': 'trials do not export; the final run does',
}
# Categorical combinations checked one by one before the first trial; a
# larger space is checked key by key.
_MAX_COMBINATIONS = 2000
_RANGE_FIELDS = {'low', 'high', 'log', 'step'}
# Integer ranges up to this many values are checked value by value.
_MAX_INT_VALUES = 64


def _same(first, second):
  """Whether two values are the same choice: equal numbers (an int and a
  float: 0 and 0.0), else equal values of one type (True is not 1)."""
  if errors.is_number(first) and errors.is_number(second):
    return first == second
  return first == second and type(first) is type(second)  # pylint: disable=unidiomatic-typecheck


@dataclasses.dataclass(frozen=True)
class Parameter:
  """One varied key: a number range or a list of choices.

  Attributes:
    key: The config key.
    kind: 'float', 'int' or 'categorical'.
    low: Lower bound of a range (inclusive).
    high: Upper bound of a range (inclusive).
    log: Sample the range on a log scale.
    step: None, or the spacing of a range's values.
    choices: The values of a categorical parameter.
  """
  key: str
  kind: str
  low: object = None
  high: object = None
  log: bool = False
  step: object = None
  choices: tuple = ()

  def to_json(self):
    """A JSON-safe dict of the parameter (the study records it)."""
    if self.kind == 'categorical':
      return {'choices': list(self.choices)}
    return {'low': self.low, 'high': self.high, 'log': self.log,
            'step': self.step, 'kind': self.kind}

  def contains(self, value):
    """Whether `value` is one this parameter can take."""
    if self.kind == 'categorical':
      return any(_same(value, choice) for choice in self.choices)
    return (errors.is_number(value) and self.low <= value <= self.high)

  def choice_of(self, value):
    """The choice that is `value` (`contains` must hold); a range: value."""
    if self.kind != 'categorical':
      return value
    return next(choice for choice in self.choices if _same(value, choice))

  def describe(self):
    if self.kind == 'categorical':
      return f'one of {list(self.choices)}'
    scale = ', log scale' if self.log else ''
    step = f', step {self.step}' if self.step is not None else ''
    return f'{self.kind} in [{self.low}, {self.high}]{scale}{step}'


@dataclasses.dataclass(frozen=True)
class Space:
  """A parsed search space file.

  Attributes:
    path: The file it was read from.
    parameters: The `Parameter`s, in the file's order.
  """
  path: str
  parameters: tuple

  @property
  def keys(self):
    return tuple(parameter.key for parameter in self.parameters)

  def to_json(self):
    """The space as JSON-safe data: what makes two studies the same."""
    return {parameter.key: parameter.to_json()
            for parameter in self.parameters}

  def suggest(self, trial):
    """Samples (or, for an enqueued or retried trial, reads) its values.

    Args:
      trial: An `optuna.Trial`.

    Returns:
      `{key: value}` for every parameter.
    """
    values = {}
    for parameter in self.parameters:
      if parameter.kind == 'categorical':
        values[parameter.key] = trial.suggest_categorical(
            parameter.key, list(parameter.choices))
      elif parameter.kind == 'int':
        values[parameter.key] = trial.suggest_int(
            parameter.key, parameter.low, parameter.high,
            step=parameter.step or 1, log=parameter.log)
      else:
        values[parameter.key] = trial.suggest_float(
            parameter.key, parameter.low, parameter.high,
            step=parameter.step, log=parameter.log)
    return values

  def variants(self, values, limit):
    """`values` with one categorical key set to another of its choices.

    In the space file's order (its switches most worth measuring first),
    each other choice of each categorical key in turn, at most `limit`.

    Returns:
      `[(values, 'key=choice')]`.
    """
    result = []
    for parameter in self.parameters:
      if parameter.kind != 'categorical':
        continue
      current = values[parameter.key]
      for choice in parameter.choices:
        if _same(choice, current):
          continue
        result.append(({**values, parameter.key: choice},
                       f'{parameter.key}={choice!r}'))
    return result[:max(0, limit)]

  def defaults(self, config):
    """`{key: config value}`, or None if a value lies outside the space."""
    values = {parameter.key: config[parameter.key]
              for parameter in self.parameters}
    if all(parameter.contains(values[parameter.key])
           for parameter in self.parameters):
      # As the space spells them (a float key's 0.0 is its choice 0).
      return {parameter.key: parameter.choice_of(values[parameter.key])
              for parameter in self.parameters}
    return None


def apply(config, values):
  """A copy of `config` with `values` ({key: value}) set; `config` unchanged."""
  result = config.copy_and_resolve_references()
  with result.unlocked():
    for key, value in values.items():
      result[key] = value
  return result


def load(path):
  """Reads a space file; checks its form (not yet against a config).

  Args:
    path: A Python file with `get_space()`.

  Returns:
    `(path, dict)`: the raw space, for `parse`.

  Raises:
    PathNotFoundError: no such file.
    ConfigError: the file fails to load or `get_space()` returns no dict.
  """
  if not path or not os.path.isfile(path):
    raise errors.PathNotFoundError(
        f'Search space file not found: --space={path!r}. Give a Python file '
        'with get_space(), e.g. --space=configs/spaces/finetune.py.')
  module_spec = importlib.util.spec_from_file_location('_keras_sft_space',
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as error:  # The file's own error, whatever its type.
    raise errors.ConfigError(
        f'Cannot load the search space file {path}: {type(error).__name__}: '
        f'{error}') from error
  if not callable(getattr(module, 'get_space', None)):
    raise errors.ConfigError(
        f'The search space file {path} has no get_space() function. Define '
        'get_space() returning {config key: range}, as in '
        'configs/spaces/finetune.py.')
  raw = module.get_space()
  if not isinstance(raw, dict) or not raw:
    raise errors.ConfigError(
        f'get_space() in {path} must return a non-empty dict {{config key: '
        f'range}}. Received: {raw!r}')
  return path, raw


def _key_type(config, key):
  """The type a config key holds (None: any, for a key whose default is
  None without a declared type)."""
  field = config._fields[key]  # pylint: disable=protected-access
  if isinstance(field, ml_collections.FieldReference):
    return field.get_type()
  return type(field) if field is not None else None


def _nullable(config, key):
  field = config._fields[key]  # pylint: disable=protected-access
  return field is None or isinstance(field, ml_collections.FieldReference)


def _fits(value, key_type, nullable):
  if value is None:
    return nullable
  if key_type is None or key_type is object:  # A key of several types.
    return isinstance(value, (bool, int, float, str))
  if key_type is bool:
    return isinstance(value, bool)
  if key_type is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if key_type is float:
    return errors.is_number(value)
  if key_type is str:
    return isinstance(value, str)
  return False


def _parse_one(path, config, key, spec):
  where = f'{key!r} in {path}'
  if not isinstance(key, str) or key not in config:
    close = difflib.get_close_matches(str(key), list(config.keys()), n=3)
    hint = f' Did you mean {" or ".join(map(repr, close))}?' if close else ''
    raise errors.ConfigError(
        f'Unknown config key {key!r} in the search space {path}.{hint} A '
        'space names keys of configs/default.py.')
  if key in _FIXED_KEYS:
    raise errors.ConfigError(
        f'The search space {path} varies {key!r}, which a study keeps fixed: '
        f'{_FIXED_KEYS[key]}. Remove it from the space (set it with '
        f'--config.{key}=...).')
  key_type = _key_type(config, key)
  nullable = _nullable(config, key)
  if not isinstance(spec, dict):
    raise errors.ConfigError(
        f'The range of {where} must be a dict, {{"low": ..., "high": ...}} or '
        f'{{"choices": [...]}}. Received: {key}={spec!r}')
  if 'choices' in spec:
    if set(spec) != {'choices'}:
      raise errors.ConfigError(
          f'The range of {where} mixes "choices" with {sorted(set(spec) - {"choices"})}. '
          f'Give either "choices" or "low"/"high". Received: {key}={spec!r}')
    choices = spec['choices']
    if not isinstance(choices, (list, tuple)) or not choices:
      raise errors.ConfigError(
          f'The choices of {where} are empty or not a list: the range holds '
          f'no value. Received: {key}={spec!r}')
    for choice in choices:
      if not _fits(choice, key_type, nullable):
        expected = key_type.__name__ if key_type else 'None, bool, int, float or str'
        raise errors.ConfigError(
            f'Wrong type in the choices of {where}: {choice!r} is '
            f'{type(choice).__name__}, the key holds {expected}'
            f'{" or None" if nullable and key_type else ""}. Received: '
            f'{key}={spec!r}')
    if any(_same(choice, other) for index, choice in enumerate(choices)
           for other in choices[:index]):
      raise errors.ConfigError(
          f'The choices of {where} repeat a value. Received: {key}={spec!r}')
    return Parameter(key, 'categorical', choices=tuple(choices))
  unknown = set(spec) - _RANGE_FIELDS
  if unknown or not {'low', 'high'} <= set(spec):
    raise errors.ConfigError(
        f'The range of {where} must have "low" and "high" (and optionally '
        f'"log", "step"), or "choices". Received: {key}={spec!r}')
  if key_type not in (int, float):
    raise errors.ConfigError(
        f'Wrong type for {where}: a low/high range needs a number key, and '
        f'{key!r} holds {getattr(key_type, "__name__", "None")}. Use '
        f'{{"choices": [...]}}. Received: {key}={spec!r}')
  low, high, log, step = (spec['low'], spec['high'], spec.get('log', False),
                          spec.get('step'))
  kind = 'int' if key_type is int else 'float'
  number_check = ((lambda value: isinstance(value, int) and
                   not isinstance(value, bool)) if kind == 'int' else
                  (lambda value: errors.is_number(value) and
                   math.isfinite(value)))
  for name, value in (('low', low), ('high', high)):
    if not number_check(value):
      raise errors.ConfigError(
          f'Wrong type for "{name}" of {where}: {value!r}; {key!r} holds '
          f'{"integers" if kind == "int" else "finite numbers"}. Received: '
          f'{key}={spec!r}')
  if not isinstance(log, bool):
    raise errors.ConfigError(f'"log" of {where} must be True or False. '
                             f'Received: {key}={spec!r}')
  if low >= high:
    raise errors.ConfigError(
        f'Empty range for {where}: low={low!r} must be below high={high!r}. '
        f'To fix the value, drop the key from the space and pass '
        f'--config.{key}={low}. Received: {key}={spec!r}')
  if log and low <= 0:
    raise errors.ConfigError(
        f'A log range needs low > 0: {where} has low={low!r}. Received: '
        f'{key}={spec!r}')
  if step is not None:
    if not number_check(step) or step <= 0 or log:
      raise errors.ConfigError(
          f'"step" of {where} must be a positive '
          f'{"integer" if kind == "int" else "number"}, without "log". '
          f'Received: {key}={spec!r}')
  if kind == 'float':
    low, high = float(low), float(high)
    step = float(step) if step is not None else None
  return Parameter(key, kind, low=low, high=high, log=log, step=step)


def parse(path, raw, config):
  """The `Space` of a raw space dict, its form checked against `config`.

  Raises:
    ConfigError: an unknown key, an empty range, a value of the wrong type.
  """
  return Space(path, tuple(_parse_one(path, config, key, spec)
                           for key, spec in raw.items()))


def _discrete_values(parameter):
  """Every value a categorical or small integer parameter can take; None
  for a float range or an integer range of more than `_MAX_INT_VALUES`."""
  if parameter.kind == 'categorical':
    return list(parameter.choices)
  if parameter.kind != 'int':
    return None
  step = parameter.step or 1
  count = (parameter.high - parameter.low) // step + 1
  if count > _MAX_INT_VALUES:
    return None
  return [parameter.low + i * step for i in range(count)]


def _assignments(space):
  """Value assignments to check: every combination of the categorical
  values and small integer ranges (each integer: a run may refuse one
  inside a range whose ends it accepts, e.g. gradient_accumulation_steps=3
  of [1, 4] for a batch of 8), with the other number ranges at both ends
  (key by key if the product is large)."""
  discrete = [(p, _discrete_values(p)) for p in space.parameters]
  numeric = [p for p, values in discrete if values is None]
  discrete = [(p, values) for p, values in discrete if values is not None]
  combinations = math.prod(len(values) for _, values in discrete)
  if combinations <= _MAX_COMBINATIONS:
    products = itertools.product(*[[(p.key, c) for c in values]
                                   for p, values in discrete])
    products = [dict(product) for product in products]
  else:
    products = [{p.key: choice} for p, values in discrete
                for choice in values]
  for end in ('low', 'high'):
    ends = {p.key: getattr(p, end) for p in numeric}
    for product in products:
      yield {**ends, **product}


def validate(space, config, check_config):
  """Checks that every value of the space makes a run the config accepts.

  Args:
    space: A `Space`.
    config: The study's base config.
    check_config: `keras_sft.training.train.check_config` (passed in: it loads
      TensorFlow, which `--help` must not).

  Raises:
    ConfigError: the base config, or one assignment of the space, fails the
      run's checks; the message names the assignment.
  """
  check_config(config)
  for assignment in _assignments(space):
    try:
      check_config(apply(config, assignment))
    except errors.ConfigError as error:
      picked = ', '.join(f'{key}={value!r}' for key, value in
                         assignment.items())
      raise errors.ConfigError(
          f'The search space {space.path} can pick values that a run '
          f'refuses ({picked}): {str(error).rstrip(".")}. Narrow the space '
          'so that every '
          'value it holds is valid.') from error
