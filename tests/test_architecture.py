"""The package's shape: no import circle (lazy, function-level imports included), no megafiles."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "loopjax")
MAX_LINES = 400


def modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def imports(path: str, known: dict) -> set[str]:
  """The package modules a file imports anywhere in it (module level or inside functions).

  `from a.b import c` counts as importing a.b.c when that is a module, else a.b.
  """
  edges = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      edges.update(alias.name for alias in node.names if alias.name in known)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
      for alias in node.names:
        edges.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
  return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of the directed graph as a list of nodes (first == last), or None."""
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt, path + [nxt])):
        return cycle
    state[node] = "done"
    return None

  for start in sorted(graph):
    if start not in state and (cycle := visit(start, [start])):
      return cycle
  return None


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
  (tmp_path / "a.py").write_text("import b\n")
  (tmp_path / "b.py").write_text("def f():\n  from a import x\n")
  known = {"a": str(tmp_path / "a.py"), "b": str(tmp_path / "b.py")}
  assert find_cycle({m: imports(p, known) for m, p in known.items()}) == ["a", "b", "a"]


def test_no_import_cycle_in_loopjax():
  known = modules()
  graph = {name: imports(path, known) - {name} for name, path in known.items()}
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_file_over_400_lines():
  sizes = {name: sum(1 for _ in open(path)) for name, path in modules().items()}
  assert len(sizes) > 40
  too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
  assert not too_long, f"split these by concept: {too_long}"
