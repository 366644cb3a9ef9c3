"""Errors a user can fix, and the checks of config values that raise them.

Every `UserError` means "what you gave is wrong", never "keras-sft is
broken": the command lines print its message as one `error: ...` line and
exit 2, without a traceback (`--verbose` or KERAS_SFT_TRACEBACK=1 shows it).
Each class also derives from the builtin a library caller would catch
(`ValueError`, `FileNotFoundError`, ...), so `except ValueError` keeps
working.

The `check_*` helpers are the building blocks of each module's
`check_config(config)`: every config key is checked in the module that owns
the value, and `recipe.check_config` calls them all before anything is
built. Messages echo what was received, in Keras' style.
"""

import math


class UserError(Exception):
  """A mistake in the input: a config value, a path, data, a workdir."""


class ConfigError(UserError, ValueError):
  """A config value (or a combination of values) that cannot work."""


class DataError(UserError, ValueError):
  """The data is not what a run needs (corrupt files, empty classes, ...)."""


class PathNotFoundError(UserError, FileNotFoundError):
  """A file or folder the user named does not exist."""


class WorkdirError(UserError, ValueError):
  """The workdir holds another run, or is in use by another process."""


class UnavailableError(UserError, RuntimeError):
  """Data or weights that are neither on this machine nor downloadable."""


class MissingDependencyError(UserError, ImportError):
  """An optional package is not installed; the message names the extra."""


class DivergedError(UserError, FloatingPointError):
  """Training produced non-finite values; the message names what to change."""


class PreemptedError(Exception):
  """The run stopped on SIGTERM after a backup: rerun it to resume.

  Not a mistake: the command lines exit with `cli.PREEMPTED_STATUS` (143),
  which schedulers read as "retry".
  """


def is_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(name, value, optional=False):
  """`value` is a finite number > 0 (or None if `optional`)."""
  if optional and value is None:
    return
  if not (is_number(value) and math.isfinite(value) and value > 0):
    raise ConfigError(f'{name} must be a positive number'
                      f'{" or None" if optional else ""}. Received: '
                      f'{name}={value!r}')


def check_integer(name, value, minimum, meaning=''):
  """`value` is an int (not a bool) >= `minimum`; `meaning` explains it."""
  if not (isinstance(value, int) and not isinstance(value, bool) and
          value >= minimum):
    kind = ('a positive integer' if minimum == 1 else
            f'an integer >= {minimum}')
    raise ConfigError(f'{name} must be {kind}{meaning}. Received: '
                      f'{name}={value!r}')


def check_at_most(name, value, maximum, reason):
  """`value` (None, or a number already checked) is at most `maximum`.

  Args:
    name: The config key.
    value: Its value.
    maximum: The largest value that can work.
    reason: Why larger values cannot, completing "larger values ...".
  """
  if value is not None and is_number(value) and value > maximum:
    raise ConfigError(f'{name} must be at most {maximum:,}: larger values '
                      f'{reason}. Received: {name}={value!r}. Use a value '
                      f'<= {maximum}.')


def check_non_negative(name, value):
  """`value` is a finite number >= 0."""
  if not (is_number(value) and math.isfinite(value) and value >= 0):
    raise ConfigError(f'{name} must be a finite number >= 0. Received: '
                      f'{name}={value!r}')


def check_fraction(name, value, upper_inclusive=False, optional=False):
  """`value` is in [0, 1), or [0, 1] with `upper_inclusive`."""
  if optional and value is None:
    return
  inside = is_number(value) and 0 <= value and (
      value <= 1 if upper_inclusive else value < 1)
  if not inside:
    interval = '[0, 1]' if upper_inclusive else '[0, 1)'
    raise ConfigError(f'{name} must be {"None or " if optional else ""}in '
                      f'{interval}. Received: {name}={value!r}')


def check_choice(name, value, choices, optional=False):
  """`value` is one of `choices` (or None if `optional`)."""
  if optional and value is None:
    return
  if value not in choices:
    expected = ('None or one of ' if optional else 'one of ') + str(
        tuple(choices))
    raise ConfigError(f'Unknown {name}: {name}={value!r}. Expected '
                      f'{expected}.')
