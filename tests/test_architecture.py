"""The layers of cnnlab hold: no import circle among its modules (imports inside functions
count), import-linter's layers contracts in pyproject.toml are kept, and ruff finds nothing."""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
  """{module: modules of the same package it imports}, from every import statement in every
  file, at module level or inside functions (`from pkg import mod` counts as importing mod)."""
  files = {_module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
  top = package_dir.name
  graph = {}
  for name, path in files.items():
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = name.split(".") if is_package else name.split(".")[:-1]
          anchor = anchor[:len(anchor) - (node.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        candidates = [f"{base}.{alias.name}" for alias in node.names]
      else:
        continue
      for candidate in candidates:  # `pkg.mod.name` imports pkg.mod.
        while candidate and candidate not in files:
          candidate = candidate.rpartition(".")[0]
        if candidate.split(".")[0] == top and candidate != name:
          targets.add(candidate)
    graph[name] = targets
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_cycle_finder_sees_a_circle_hidden_inside_a_function(tmp_path):
  package = tmp_path / "pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "a.py").write_text("from pkg import b\n")
  (package / "b.py").write_text("def f():\n  from pkg import c\n")
  (package / "c.py").write_text("def g():\n  import pkg.a\n")
  assert cycles(import_graph(package)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_cnnlab_has_no_import_circle():
  graph = import_graph(ROOT / "cnnlab")
  assert len(graph) > 50  # Every module was read.
  assert cycles(graph) == []


def _tool(name: str) -> str:
  path = shutil.which(name, path=str(pathlib.Path(sys.executable).parent)) or shutil.which(name)
  if path is None:
    pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
  return path


def test_import_linter_layers_contracts_are_kept():
  done = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
  assert "0 broken" in done.stdout


def test_ruff_finds_nothing():
  done = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
