"""Fixtures of the fault suites: one tiny model and one uninterrupted reference run, shared."""

import os

import pytest

from tests import make_tiny_model
from tests.reliability import harness


@pytest.fixture(scope="session")
def faults_model(tmp_path_factory):
  return make_tiny_model.main(str(tmp_path_factory.mktemp("faults_model")))


@pytest.fixture(scope="session")
def reference(faults_model, tmp_path_factory):
  """An uninterrupted run, stage by stage: outputs, the fault points passed, durations."""
  root = tmp_path_factory.mktemp("reference")
  workdir = str(root / "run")
  out = {"workdir": workdir, "traces": {}, "seconds": {}, "outputs": {}}
  for stage in harness.STAGES:
    trace = str(root / f"{stage}.trace")
    start = os.times().elapsed
    harness.check_ok(harness.run(workdir, faults_model, stage, trace=trace))
    out["seconds"][stage] = os.times().elapsed - start
    out["traces"][stage] = harness.read_trace(trace)
    out["outputs"][stage] = harness.OUTPUTS[stage](workdir)
  return out
