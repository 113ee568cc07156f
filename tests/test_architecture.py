"""The house rules, checked over the import graph of the source (no import is executed):
no import circle, no library module that imports an experiment module, no project import
hidden inside a function, a curated `__all__` in every package, and notebooks that use
only the curated APIs."""

import ast
import glob
import importlib
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("lqf", "pc", "bct")


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for pkg in PACKAGES:
    for f in (ROOT / pkg).rglob("*.py"):
      name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
      mods[name.removesuffix(".__init__")] = f
  return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
  """(imported project module, whether the import sits inside a function) for each
  import; `from P import x` counts as importing P and P.x, as Python runs P's __init__."""
  tree = ast.parse(path.read_text())
  inner = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
           for n in ast.walk(fn) if n is not fn}
  out = []
  for n in ast.walk(tree):
    targets = []
    if isinstance(n, ast.Import):
      targets = [a.name for a in n.names]
    elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
      targets = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
    for t in targets:
      r = _resolve(t)
      if r:
        out.append((r, id(n) in inner))
  return out


EDGES = {m: {t for t, _ in _imports(f) if t != m} for m, f in MODULES.items()}


def _is_experiment(module: str) -> bool:
  parts = module.split(".")
  return "experiments" in parts or parts[-1] == "__main__"


def test_the_import_graph_has_no_circle():
  index, low, stack, on, circles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in EDGES[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        circles.append(sorted(comp))

  for m in sorted(MODULES):
    if m not in index:
      visit(m)
  assert not circles


def test_no_library_module_imports_an_experiment_module():
  bad = [(m, t) for m, ts in EDGES.items() if not _is_experiment(m)
         for t in ts if _is_experiment(t)]
  assert not bad


def test_no_project_import_is_hidden_inside_a_function():
  hidden = [(m, t) for m, f in MODULES.items() for t, inside in _imports(f) if inside]
  assert not hidden


def test_the_checks_see_the_layout():
  """The graph holds the library and experiment modules the rules are about (so the
  tests above cannot pass on an empty graph)."""
  assert {"lqf.solve", "lqf.runtime.train", "lqf.experiments.cli", "pc.experiments.train",
          "bct.lqf_term"} <= set(MODULES)
  assert "lqf.solve" in EDGES["pc.lqf_term"]
  assert _is_experiment("pc.experiments.bench") and not _is_experiment("pc.metrics")


@pytest.mark.parametrize("package", sorted(m for m, f in MODULES.items()
                                           if f.name == "__init__.py"))
def test_every_package_curates_its_api(package):
  mod = importlib.import_module(package)
  assert hasattr(mod, "__all__") and mod.__doc__, package
  for name in mod.__all__:
    assert hasattr(mod, name), f"{package}.__all__ names {name!r}, which it lacks"


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "notebooks" / "*.py"))),
                         ids=os.path.basename)
def test_notebooks_import_only_curated_apis(path):
  tree = ast.parse(pathlib.Path(path).read_text())
  for n in ast.walk(tree):
    if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] in PACKAGES:
      api = importlib.import_module(n.module)
      assert MODULES[n.module].name == "__init__.py", f"{n.module} is not a package"
      for a in n.names:
        assert a.name in api.__all__, f"{path}: {n.module}.{a.name} is not in its __all__"
    elif isinstance(n, ast.Import):
      for a in n.names:
        assert a.name.split(".")[0] not in PACKAGES or a.name in MODULES and \
            MODULES[a.name].name == "__init__.py", f"{path} imports module {a.name}"
