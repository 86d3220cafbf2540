"""Fixtures of the fault suites: one tiny model and one uninterrupted reference run, shared."""

import time

import pytest

from tests import make_tiny_model
from tests.reliability import harness


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  """The random tiny model folder (tests/make_tiny_model.py) every reliability test alters
  copies of or runs."""
  return make_tiny_model.main(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def reference(tiny_model, tmp_path_factory):
  """An uninterrupted run, stage by stage: outputs, the fault points passed, durations.

  A first pass fills the JAX compilation cache (harness.use_compile_cache) that every later
  process copies; the reference is the second pass, so its timings (which place the external
  kills) are those of a process that starts with a warm cache, as the tested ones do."""
  root = tmp_path_factory.mktemp("reference")
  cache = str(tmp_path_factory.mktemp("jax_cache") / "cache")
  harness.use_compile_cache(cache, shared=True)
  for stage in harness.STAGES:
    harness.check_ok(harness.run(str(root / "warmup"), tiny_model, stage))
  workdir = str(root / "run")
  out = {"workdir": workdir, "traces": {}, "work_window": {}, "outputs": {}}
  for stage in harness.STAGES:
    trace = str(root / f"{stage}.trace")
    start = time.time()
    harness.check_ok(harness.run(workdir, tiny_model, stage, trace=trace))
    points = harness.read_trace(trace)
    # Seconds from launch to the first fault point (start-up, loading) and to the end.
    out["work_window"][stage] = (points[0][1] - start, time.time() - start)
    out["traces"][stage] = [name for name, _ in points]
    out["outputs"][stage] = harness.OUTPUTS[stage](workdir)
  harness.use_compile_cache(cache)
  return out
