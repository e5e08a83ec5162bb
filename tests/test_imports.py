"""The package's imports run one way: no cycles, no imports hidden inside functions, and no
module importing a layer above its own (data < core < config/evaluation/report < methods <
experiment)."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "tdr_jax"

# Layer of a module by its dotted name (first matching prefix wins); a module may import only
# modules of its own or lower layers.
LAYERS = [
    ("tdr_jax.errors", 0),
    ("tdr_jax.data", 1),
    ("tdr_jax.experiment", 5),
    ("tdr_jax.serving", 5),  # tdr_jax.experiment writes its vocabulary file
    ("tdr_jax.methods", 4),
    ("tdr_jax.config", 3),
    ("tdr_jax.evaluation", 3),
    ("tdr_jax.report", 3),
    ("tdr_jax", 2),  # the core: tree, losses, samplers, models, training, baselines, ...
]


def layer(module: str) -> int:
  for prefix, value in LAYERS:
    if module == prefix or module.startswith(prefix + "."):
      return value
  raise AssertionError(module)


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def resolve(name: str, modules: set[str]) -> str | None:
  """The package module `name` refers to (a module, or the package whose attribute it is)."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def imports_of(tree: ast.Module, modules: set[str]):
  """Yields (module imported, line, inside a function or class) for tdr_jax imports."""
  nested = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      nested.update(id(n) for n in ast.walk(node) if n is not node)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      if name.split(".")[0] == "tdr_jax":
        target = resolve(name, modules)
        if target and target != "tdr_jax":
          yield target, node.lineno, id(node) in nested


def import_graph(root: pathlib.Path = PKG):
  """({module: {imported modules}}, [problems: imports inside functions, upward imports])."""
  files = {module_name(p, root): p for p in root.rglob("*.py")}
  modules = set(files)
  graph, problems = {}, []
  for name, path in sorted(files.items()):
    graph[name] = set()
    for target, line, inside in imports_of(ast.parse(path.read_text()), modules):
      if inside:
        problems.append(f"{name}:{line} imports {target} inside a function or class")
      if layer(target) > layer(name):
        problems.append(f"{name}:{line} imports {target}, a layer above it")
      if target != name:
        graph[name].add(target)
  return graph, problems


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a list of modules, or None."""
  state: dict[str, int] = {}  # 1 = on the stack, 2 = done
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_find_cycle_by_hand():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"a2"}, "a2": set(), "x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]


def test_detects_hidden_and_upward_imports(tmp_path):
  pkg = tmp_path / "tdr_jax"
  (pkg / "data").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "data" / "__init__.py").write_text("")
  (pkg / "experiment.py").write_text("from tdr_jax.data import loaders\n")
  (pkg / "data" / "loaders.py").write_text(
      "def f():\n  from tdr_jax import experiment\n  return experiment\n")
  graph, problems = import_graph(pkg)
  assert graph["tdr_jax.experiment"] == {"tdr_jax.data.loaders"}
  assert any("inside a function" in p for p in problems)
  assert any("a layer above" in p for p in problems)
  assert find_cycle(graph) == ["tdr_jax.data.loaders", "tdr_jax.experiment",
                               "tdr_jax.data.loaders"]


def test_package_imports_run_one_way():
  graph, problems = import_graph()
  assert "tdr_jax.experiment" in graph and "tdr_jax.data.batches" in graph
  assert problems == []
  assert find_cycle(graph) is None


@pytest.mark.parametrize("module", ["tdr_jax.experiment", "tdr_jax.methods"])
def test_registry_modules_import_cleanly(module):
  __import__(module)
