"""What the command lines share: one-line errors for the user's mistakes.

`run(main)` runs an absl `main`. A `keras_sft.errors.UserError` (a bad config
value, a missing path, bad data, a workdir holding another run, a run that
diverged) prints one `error: ...` line, whose message names the fix, and
exits with status 2 (1 for a diverged run: the input was valid); any other
exception is a bug and keeps its traceback. A run stopped by SIGTERM after
its backup exits with 143 (`PREEMPTED_STATUS`): rerun it to resume.
`--verbose` or KERAS_SFT_TRACEBACK=1 shows the traceback of user errors too.
`--help` (and `--helpfull`, ...) exits 0.

The commands run on Keras' TensorFlow backend: an unset KERAS_BACKEND is set
to `tensorflow` before Keras loads, and another one is a user error.

Imports no TensorFlow, so `--help` and flag errors are immediate.
"""

import functools
import os
import sys

from absl import app
from absl import flags

from keras_sft import errors
from keras_sft import files

_VERBOSE = flags.DEFINE_bool(
    'verbose', False, 'Show the traceback of user errors too (as does '
    'KERAS_SFT_TRACEBACK=1).')

# Exit status of a user error, and of a run that diverged.
USER_ERROR_STATUS = 2
DIVERGED_STATUS = 1
# Exit status of a run stopped by SIGTERM after writing a backup: 128 + 15,
# what a shell reports for a process SIGTERM ended, and what schedulers read
# as "retry" (Kubeflow's restartPolicy: ExitCode retries 130, 137 and 143
# and treats 1 and 2 as permanent).
PREEMPTED_STATUS = 143
# The Keras backend the commands run on (`keras.backend.backend()`).
KERAS_BACKEND = 'tensorflow'
# What a config written for keras-sft 0.1 must change.
_UPGRADE_HINT = (
    ' keras-sft 0.2 moved its modules into folders (README "Upgrading from '
    '0.1"): a config imports `from keras_sft import default_config` and '
    '`from keras_sft.training import hyperrule`.')
# absl's help flags, which print the help and exit 1.
_HELP_FLAGS = ('help', 'helpshort', 'helpfull', 'helpxml', '?')


def _show_tracebacks():
  return _VERBOSE.value or os.environ.get('KERAS_SFT_TRACEBACK')


def _fail(message, status=USER_ERROR_STATUS):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def check_keras_backend():
  """Sets KERAS_BACKEND to tensorflow, or refuses another one.

  Must run before Keras is imported, which reads it once. An unset (or
  empty) KERAS_BACKEND is set, overriding a `backend` in ~/.keras/keras.json,
  a machine-wide default for every Keras program. One the user set in the
  environment is refused rather than overridden: it says what they expect
  to run on, and a run that silently used another backend (for a benchmark,
  say) would mislead them.

  Raises:
    ConfigError: KERAS_BACKEND names another backend.
  """
  backend = os.environ.get('KERAS_BACKEND')
  if not backend:
    os.environ['KERAS_BACKEND'] = KERAS_BACKEND
  elif backend != KERAS_BACKEND:
    raise errors.ConfigError(
        f'keras-sft runs on the {KERAS_BACKEND} backend of Keras. Received: '
        f'KERAS_BACKEND={backend!r} in the environment. Unset it or set '
        f'KERAS_BACKEND={KERAS_BACKEND} for this command.')


def _call(main, started, argv):
  started.append(True)
  try:
    check_keras_backend()
    return main(argv)
  except errors.UserError as error:
    if _show_tracebacks():
      raise
    _fail(error, DIVERGED_STATUS if isinstance(error, errors.DivergedError)
          else USER_ERROR_STATUS)
  except errors.PreemptedError as error:
    print(f'preempted: {error}', file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_STATUS)
  except Exception as error:  # pylint: disable=broad-except
    reason = files.write_failure(error)
    if reason is None or _show_tracebacks():
      raise
    detail = str(error).strip().splitlines()[0][:500] if str(error) else ''
    _fail(f'{reason} ({detail}). Free space on that disk (or raise the '
          'file size limit, `ulimit -f`), then rerun the same command: what '
          'was written before is kept (backups and exports are written '
          'aside and renamed into place).')


def _innermost_message(error):
  """The text of a (Key|Attribute)Error that wraps another: ml_collections'."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return str(error.args[0]) if error.args else str(error)


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag as one `error:` line, status 2.

  absl's own parser prints `FATAL Flags parsing error` and exits 1, the
  status of a run that diverged; its help flags print the help and exit 1
  too, here 0.
  """
  try:
    return flags.FLAGS(argv)
  except SystemExit as exit_:
    if exit_.code == 1 and _asks_for_help(argv):
      sys.exit(0)
    raise
  except flags.Error as error:
    if os.environ.get('KERAS_SFT_TRACEBACK'):
      raise
    _fail(f'bad command line flag: {error}. Pass --helpfull to see the '
          'flags.')


def _asks_for_help(argv):
  """Whether `argv` holds one of absl's help flags (before a `--`)."""
  for argument in argv[1:]:
    if argument == '--':
      return False
    name = argument.lstrip('-').split('=', 1)[0]
    if argument.startswith('-') and name in _HELP_FLAGS:
      return True
  return False


def run(main):
  """`absl.app.run(main)`, with user errors as one line (see module doc)."""
  started = []
  try:
    app.run(functools.partial(_call, main, started),
            flags_parser=_parse_flags)
  except ImportError as error:
    # Raised while the --config file is loaded (at flag parsing).
    if started or os.environ.get('KERAS_SFT_TRACEBACK'):
      raise
    _fail(f'the --config file cannot be imported: {error}.'
          + (_UPGRADE_HINT if 'keras_sft' in str(error) else ''))
  except (KeyError, AttributeError, TypeError, ValueError) as error:
    # absl reports most flag errors itself; ml_collections raises these for
    # a `--config.KEY` override that names no key or has the wrong type.
    if started or os.environ.get('KERAS_SFT_TRACEBACK'):
      raise
    _fail(f'bad command line flag: {_innermost_message(error)}')


def loaded_config(config_flag):
  """The ConfigDict of an ml_collections `--config` flag.

  Raises:
    ConfigError: the config file could not be loaded (ml_collections defers
      that error to the first use of the config).
  """
  config = config_flag.value
  if type(config).__name__ == '_ErrorConfig':
    try:
      config.to_dict()
    except Exception as error:  # The stored load error, whatever its type.
      raise errors.ConfigError(f'Cannot load --config: {error}') from error
  return config


def check_no_arguments(argv):
  """Refuses positional arguments (the commands take flags only)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
