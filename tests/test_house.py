"""The house rules of the layout, read from the source with `ast` (imports inside functions
count too): no import circle in stt_jax/, the library knows no pipeline, models know no stage
or task, tasks know no model, and config files import only stt_jax.run_config.

    python -m tests.test_house        # prints the import graph, one module per line
"""

from __future__ import annotations

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stt_jax"

# The pipeline: the run config, the run folder, the stages and the entry points on top of the
# library. Everything else in stt_jax/ is library and must not import these.
PIPELINE = ("stt_jax.main", "stt_jax.cli", "stt_jax.evaluate", "stt_jax.run_config",
            "stt_jax.workdir", "stt_jax.preflight", "stt_jax.budgets", "stt_jax.memory_plan",
            "stt_jax.supervisor", "stt_jax.stages")
# What a model module may import besides stt_jax.models itself: no stage, task or pipeline.
MODEL_MAY_IMPORT = ("stt_jax.models", "stt_jax.sharding", "stt_jax.appendlog", "stt_jax.faults")


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: dict) -> str:
  """The longest known module that `name` is or lies in (`stt_jax.models.load_hf` ->
  `stt_jax.models`)."""
  while name not in known and "." in name:
    name = name.rsplit(".", 1)[0]
  return name


def imports(path: pathlib.Path, known: dict) -> set[str]:
  """stt_jax modules imported anywhere in the file."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    out |= {_resolve(n, known) for n in names if n.split(".")[0] == "stt_jax"}
  return out


def import_graph() -> dict[str, set[str]]:
  known = modules()
  return {name: imports(path, known) - {name} for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
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
        out.append(sorted(comp))

  sys.setrecursionlimit(10000)
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _within(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_circle():
  graph = import_graph()
  assert len(graph) > 30  # The walk really found the package.
  assert cycles(graph) == []


def test_cycle_finder_finds_one():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_knows_no_pipeline():
  bad = {m: sorted(d for d in deps if _within(d, PIPELINE))
         for m, deps in import_graph().items() if not _within(m, PIPELINE)}
  assert {m: d for m, d in bad.items() if d} == {}


def test_models_know_no_stage_or_task():
  bad = {m: sorted(d for d in deps if not _within(d, MODEL_MAY_IMPORT))
         for m, deps in import_graph().items() if _within(m, ("stt_jax.models",))}
  assert {m: d for m, d in bad.items() if d} == {}


def test_tasks_know_no_model():
  bad = {m: sorted(d for d in deps if not _within(d, ("stt_jax.tasks",)))
         for m, deps in import_graph().items() if _within(m, ("stt_jax.tasks",))}
  assert {m: d for m, d in bad.items() if d} == {}


def test_configs_import_only_run_config():
  files = sorted((ROOT / "configs").glob("*.py"))
  assert len(files) >= 14
  for path in files:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        found += [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        found += [f"{node.module}.{a.name}" for a in node.names]
    expected = [] if path.name == "__init__.py" else ["stt_jax.run_config"]
    assert found == expected, path.name


def test_nothing_imports_the_entry_point():
  assert [m for m, deps in import_graph().items() if "stt_jax.main" in deps] == []


if __name__ == "__main__":
  for name, deps in sorted(import_graph().items()):
    print(f"{name} -> {', '.join(sorted(deps)) or '-'}")
