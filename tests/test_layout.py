"""The package's import graph has no cycle: every import counts, the ones inside functions too
(an import moved into a function to dodge a cycle is still a cycle in the design)."""
import ast
import os

from helpers import REPO

PACKAGES = ('pathways_jax', 'kernels_cpu', 'kernels_pallas')


def _modules() -> dict[str, str]:
  """Module name -> file, for every module of the project's packages."""
  mods = {}
  for package in PACKAGES:
    for root, _, files in os.walk(os.path.join(REPO, package)):
      for f in files:
        if f.endswith('.py'):
          path = os.path.join(root, f)
          name = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
          mods[name.removesuffix('.__init__')] = path
  return mods


def import_graph() -> dict[str, set[str]]:
  mods = _modules()
  graph = {m: set() for m in mods}
  for mod, path in mods.items():
    package = mod if path.endswith('__init__.py') else mod.rpartition('.')[0]
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          parent = package.split('.')[:len(package.split('.')) - node.level + 1]
          base = '.'.join(parent + ([base] if base else []))
        names = [base] + [f'{base}.{a.name}' for a in node.names]
      else:
        continue
      graph[mod].update(n for n in names if n in mods and n != mod)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
  colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
  path = []

  def visit(node):
    colour[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if colour[nxt] == 1:
        return path[path.index(nxt):] + [nxt]
      if colour[nxt] == 0 and (cycle := visit(nxt)):
        return cycle
    path.pop()
    colour[node] = 2
    return None

  for node in sorted(graph):
    if colour[node] == 0 and (cycle := visit(node)):
      return cycle
  return None


def test_the_import_graph_has_no_cycle():
  graph = import_graph()
  assert len(graph) > 30 and graph['pathways_jax.train.loop']  # the walk sees the package
  cycle = find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None
