"""A truncated or half-written newest checkpoint: training warns, sets it aside, resumes from
the previous one and ends exactly where an undamaged run ends; eval skips it with a warning
and scores everything else."""

import glob
import os

import pytest

from tests.reliability import harness

pytestmark = pytest.mark.faults


def _damage(step_dir: str, how: str) -> None:
  if how == "truncated":  # Every array data file cut to half its size.
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                                  recursive=True) if os.path.isfile(p)]
    assert files
    for path in files:
      os.truncate(path, os.path.getsize(path) // 2)
  else:  # A save that wrote its metadata but not the arrays' data.
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d"), recursive=True):
      for name in os.listdir(path):
        os.remove(os.path.join(path, name))


@pytest.mark.parametrize("how", ["truncated", "half_written"])
def test_train_skips_a_damaged_checkpoint_and_resumes_from_the_previous(
    how, reference, tiny_model, tmp_path):
  workdir = str(tmp_path / "run")
  harness.prepare(reference["workdir"], workdir, "eval")  # Translated and trained.
  run_dir = os.path.join(workdir, "runs", "zero_shot")
  _damage(os.path.join(run_dir, "checkpoints", "4"), how)
  os.remove(os.path.join(run_dir, "train_done.json"))  # As if stopped before finishing.

  proc = harness.run(workdir, tiny_model, "train")
  harness.check_ok(proc)
  assert "step 4 in" in proc.stderr and "cannot be restored" in proc.stderr, proc.stderr[-3000:]
  assert "resumed from step 2" in proc.stderr
  assert glob.glob(os.path.join(run_dir, "checkpoints.corrupt", "4-*"))  # Kept for a look.
  harness.assert_same("train", harness.train_outputs(workdir),
                      reference["outputs"]["train"])
  harness.record("checkpoint_damage", stage="train", fault=how, lost_bytes=0)


def test_eval_skips_a_damaged_checkpoint_with_a_warning(reference, tiny_model, tmp_path):
  workdir = str(tmp_path / "run")
  harness.prepare(reference["workdir"], workdir, "eval")
  _damage(os.path.join(workdir, "runs", "zero_shot", "checkpoints", "4"), "truncated")

  proc = harness.run(workdir, tiny_model, "eval")
  harness.check_ok(proc)
  assert "eval: skipping zero_shot@4: checkpoints: step 4 in" in proc.stderr, proc.stderr[-3000:]
  got = harness.eval_outputs(workdir)
  want = reference["outputs"]["eval"]
  assert {(r["variant"], r["step"]) for r in got["rows"]} == {
      (r["variant"], r["step"]) for r in want["rows"]} - {("zero_shot", 4)}
  harness.assert_same_eval(
      got, {"rows": [r for r in want["rows"] if (r["variant"], r["step"]) != ("zero_shot", 4)],
            "predictions": {k: v for k, v in want["predictions"].items()
                            if not k.startswith("zero_shot-4-")}})
  harness.record("checkpoint_damage", stage="eval", fault="truncated", lost_bytes=0)
