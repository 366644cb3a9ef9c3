"""Tests of the package as a whole: import graph and lazy submodules."""

import ast
import os
import subprocess
import sys

import conftest

_PACKAGE = os.path.join(conftest.REPO_ROOT, 'keras_sft')


def _module_names():
  """Every module of the package, dotted, without the package's own name."""
  names = []
  for directory, _, files in os.walk(_PACKAGE):
    relative = os.path.relpath(directory, _PACKAGE)
    prefix = '' if relative == '.' else relative.replace(os.sep, '.') + '.'
    names += [prefix + name[:-3] for name in files
              if name.endswith('.py') and name != '__init__.py']
  return sorted(names)


def _imports_of(path, modules):
  """Modules of `modules` that `path` imports, at the top or in functions."""
  with open(path) as file:
    tree = ast.parse(file.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith(
        'keras_sft'):
      package = node.module[len('keras_sft.'):]
      for alias in node.names:
        name = f'{package}.{alias.name}' if package else alias.name
        found.add(name if name in modules else package)
    elif isinstance(node, ast.Import):
      found.update(alias.name[len('keras_sft.'):] for alias in node.names
                   if alias.name.startswith('keras_sft.'))
  return found & set(modules)


def _import_graph():
  modules = _module_names()
  return {module: _imports_of(
      os.path.join(_PACKAGE, *module.split('.')) + '.py', modules)
          for module in modules}


def _find_cycle(graph):
  """A list of modules forming a cycle, or None."""
  state = {}

  def visit(module, path):
    state[module] = 'open'
    for target in sorted(graph[module]):
      if state.get(target) == 'open':
        return path[path.index(target):] + [target]
      if target not in state:
        cycle = visit(target, path + [target])
        if cycle:
          return cycle
    state[module] = 'done'
    return None

  for module in graph:
    if module not in state:
      cycle = visit(module, [module])
      if cycle:
        return cycle
  return None


def test_no_import_cycle_among_the_modules():
  graph = _import_graph()
  assert 'export.saved_model' in graph['training.train']
  assert 'training.train' not in graph['export.saved_model']
  assert _find_cycle(graph) is None, ' -> '.join(_find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
  assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [
      'a', 'b', 'c', 'a']
  assert _find_cycle({'a': {'b'}, 'b': set()}) is None


# The public surface: README's library section uses these, and they keep
# their meaning across releases. Changing it is a decision, not a refactor.
_PUBLIC = (
    'Classifier', 'FusedSGD', 'UserError', 'create_datasets', 'create_model',
    'create_network', 'create_optimizer', 'create_schedule', 'evaluate',
    'export_run', 'export_saved_model', 'scaled_learning_rate',
    'train_and_evaluate')


def test_public_surface_is_the_documented_list():
  import keras_sft  # pylint: disable=g-import-not-at-top
  assert sorted(set(keras_sft.__all__) - {
      'data', 'models', 'training', 'export', 'default_config'}) == sorted(
          _PUBLIC)


def test_every_public_name_resolves_every_time():
  """A public name must not be shadowed by a submodule once it is imported
  (keras_sft.default_config was a function until its module loaded)."""
  import keras_sft  # pylint: disable=g-import-not-at-top
  first = {name: getattr(keras_sft, name) for name in keras_sft.__all__}
  from keras_sft import training  # pylint: disable=g-import-not-at-top,unused-import
  keras_sft.default_config.get_config()
  for name in keras_sft.__all__:
    assert getattr(keras_sft, name) is first[name], name


def test_readme_library_section_uses_only_public_names():
  import re  # pylint: disable=g-import-not-at-top
  import keras_sft  # pylint: disable=g-import-not-at-top
  with open(os.path.join(conftest.REPO_ROOT, 'README.md')) as file:
    readme = file.read()
  section = readme[readme.index('## Use it as a library'):]
  section = section[:section.index('\n## ', 1)]
  used = set(re.findall(r'keras_sft\.(\w+)', section)) - {'__all__'}
  assert used and used <= set(keras_sft.__all__), used - set(
      keras_sft.__all__)


def test_package_imports_submodules_on_first_use():
  code = ('import sys, keras_sft\n'
          'print("before", "tensorflow" in sys.modules)\n'
          'keras_sft.UserError\n'
          'print("errors", "tensorflow" in sys.modules)\n'
          'keras_sft.create_network\n'
          'print("models", "tensorflow" in sys.modules)\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=120, cwd=conftest.REPO_ROOT,
                          env=conftest.cli_env())
  assert result.stdout.split('\n')[:3] == [
      'before False', 'errors False', 'models True'], result.stderr
