"""Tests of the package as a whole: import graph and lazy submodules."""

import ast
import os
import subprocess
import sys

import conftest

_PACKAGE = os.path.join(conftest.REPO_ROOT, 'keras_sft')


def _imports_of(path):
  """keras_sft modules `path` imports, at the top or inside functions."""
  with open(path) as file:
    tree = ast.parse(file.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == 'keras_sft':
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith(
        'keras_sft.'):
      found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found.update(alias.name.split('.')[1] for alias in node.names
                   if alias.name.startswith('keras_sft.'))
  return found


def _import_graph():
  modules = sorted(name[:-3] for name in os.listdir(_PACKAGE)
                   if name.endswith('.py') and name != '__init__.py')
  return {module: _imports_of(os.path.join(_PACKAGE, f'{module}.py'))
          & set(modules) for module in modules}


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
  assert 'serving' in graph['train'] and 'train' not in graph['serving']
  assert _find_cycle(graph) is None, ' -> '.join(_find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
  assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [
      'a', 'b', 'c', 'a']
  assert _find_cycle({'a': {'b'}, 'b': set()}) is None


def test_every_module_is_listed_for_lazy_import():
  import keras_sft  # pylint: disable=g-import-not-at-top
  # The training command and the deprecated export command are no library.
  commands = {'main', 'export_main'}
  assert sorted(keras_sft.__all__) == sorted(set(_import_graph()) - commands)


def test_package_imports_submodules_on_first_use():
  code = ('import sys, keras_sft\n'
          'print("before", "tensorflow" in sys.modules)\n'
          'keras_sft.errors\n'
          'print("errors", "tensorflow" in sys.modules)\n'
          'keras_sft.models.create_network\n'
          'print("models", "tensorflow" in sys.modules)\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=120, cwd=conftest.REPO_ROOT,
                          env=conftest.cli_env())
  assert result.stdout.split('\n')[:3] == [
      'before False', 'errors False', 'models True'], result.stderr
