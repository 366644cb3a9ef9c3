"""The optional packages of an export format, imported on demand."""

import importlib

from keras_sft import errors


def require(format_name, names, extra):
  """Imports `names` for `format_name`; returns the modules by name.

  Raises:
    MissingDependencyError: One is not installed; names the extra
      (`pip install keras-sft[<extra>]`).
  """
  modules = {}
  for name in names:
    try:
      modules[name] = importlib.import_module(name)
    except ImportError as error:
      raise errors.MissingDependencyError(
          f'The {format_name} format needs the Python package {name!r}, '
          f'which is not installed ({error}): pip install '
          f'keras-sft[{extra}]') from error
  return modules
