"""kill -9 anywhere in translate, train and eval; rerunning the same command must finish with
exactly the outputs of an uninterrupted run, and keep everything that was already finished.

Every stage is interrupted at 5 seeded points drawn from the places a real run passes
(stt_jax/faults.py), once in the middle of an append (a torn line), and once by a SIGKILL
from outside after a seeded random delay. A full disk (ENOSPC at a write) must end in one
error line with the earlier outputs intact.
"""

import shutil

import numpy as np
import pytest

from tests.reliability import harness

pytestmark = pytest.mark.faults

SEED = 20261126
STAGES = harness.STAGES
CASES = [f"point{i}" for i in range(5)] + ["torn", "external"]


def _fault(stage: str, case: str, trace: list[str]) -> str:
  """The STT_JAX_FAULT spec of a case (seeded: the same points on every machine)."""
  rng = np.random.default_rng([SEED, STAGES.index(stage)])
  if case.startswith("point"):
    return harness.pick_points(trace, 5, rng)[int(case[len("point"):])]
  point = harness.WRITE_POINTS[stage]
  hits = trace.count(point)
  assert hits >= 2, (stage, point, trace)
  return f"{point}:{int(rng.integers(1, hits + 1))}:torn"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stage", STAGES)
def test_kill_then_rerun_equals_uninterrupted(stage, case, reference, tiny_model, tmp_path):
  workdir = str(tmp_path / "run")
  harness.prepare(reference["workdir"], workdir, stage)
  if case == "external":
    rng = np.random.default_rng([SEED, STAGES.index(stage), 7])
    begin, end = reference["work_window"][stage]  # Kill while the stage works.
    delay = begin + float(rng.uniform(0.05, 0.95)) * (end - begin)
    for _ in range(4):  # A faster machine may finish first: start again, kill sooner.
      killed = harness.run_killed_after(workdir, tiny_model, stage, delay)
      if killed.returncode == -9:
        break
      harness.check_ok(killed)
      shutil.rmtree(workdir)
      harness.prepare(reference["workdir"], workdir, stage)
      delay = begin + (delay - begin) * 0.5
    assert killed.returncode == -9, f"finished within {delay:.1f}s every time"
    fault = f"SIGKILL after {delay:.1f}s"
  else:
    fault = _fault(stage, case, reference["traces"][stage])
    killed = harness.run(workdir, tiny_model, stage, fault=fault)
    assert killed.returncode == -9, (fault, killed.returncode, killed.stderr[-3000:])
  finished = harness.finished_work(workdir)

  rerun = harness.run(workdir, tiny_model, stage)
  harness.check_ok(rerun)
  harness.assert_same(stage, harness.OUTPUTS[stage](workdir), reference["outputs"][stage])
  lost = harness.lost_bytes(finished, workdir)
  assert lost == 0, f"{fault}: {lost} bytes of finished work lost"
  harness.record("kill", stage=stage, fault=fault, killed=killed.returncode == -9,
                 finished_bytes=sum(len(l.encode()) for v in finished.lines.values()
                                    for l in v) + sum(s for _, s in finished.files.values()),
                 lost_bytes=lost)


@pytest.mark.parametrize("stage", STAGES)
def test_disk_full_is_one_line_and_keeps_earlier_outputs(stage, reference, tiny_model,
                                                         tmp_path):
  workdir = str(tmp_path / "run")
  harness.prepare(reference["workdir"], workdir, stage)
  point = harness.WRITE_POINTS[stage]
  fault = f"{point}:{reference['traces'][stage].count(point)}:enospc"  # The last write.
  proc = harness.run(workdir, tiny_model, stage, fault=fault)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: disk full while writing "), last
  assert "No space left on device" in last and "finished work is kept" in last, last
  finished = harness.finished_work(workdir)
  assert any(finished.lines.values())  # Earlier appends are there, whole.

  harness.check_ok(harness.run(workdir, tiny_model, stage))  # Space freed: rerun.
  harness.assert_same(stage, harness.OUTPUTS[stage](workdir), reference["outputs"][stage])
  assert harness.lost_bytes(finished, workdir) == 0
  harness.record("disk_full", stage=stage, fault=fault, message=last, lost_bytes=0)


def test_checkpoint_write_past_the_file_size_limit_is_one_line(reference, tiny_model,
                                                               tmp_path):
  """A real kernel refusal inside orbax/tensorstore (the checkpoint's array data file is the
  only file over 40 kB): one error line, translations intact, rerun completes."""
  workdir = str(tmp_path / "run")
  harness.prepare(reference["workdir"], workdir, "train")
  before = harness.translate_outputs(workdir)
  proc = harness.run(workdir, tiny_model, "train", max_file_bytes=40_000)
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: disk full while writing "), last
  assert "/checkpoints/" in last and "(File too large)" in last, last
  assert harness.translate_outputs(workdir) == before

  harness.check_ok(harness.run(workdir, tiny_model, "train"))
  harness.assert_same("train", harness.train_outputs(workdir), reference["outputs"]["train"])
  harness.record("disk_full", stage="train", fault="RLIMIT_FSIZE=40000 (EFBIG in tensorstore)",
                 message=last, lost_bytes=0)
