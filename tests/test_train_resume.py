"""Kill -9 mid-run, resume, SIGTERM, resume again: the loss sequence equals an uninterrupted run
bit for bit (LoRA with dropout, so the rng and the data position must resume too), and the
TensorBoard event file beside the log holds each step once.

Each run is a real subprocess (`python -m tests.test_train_resume MODEL WORKDIR`) on a
2-device mesh; the runs share a persistent compilation cache so only the first compiles.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stt_jax import tensorboard
from tests.test_train_helpers import read_metrics

STEPS = 14
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(model: str, workdir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from stt_jax import sharding, train, train_data  # pylint: disable=g-import-not-at-top
  from tests import test_train_helpers as helpers  # pylint: disable=g-import-not-at-top

  # Slow each step down a little so the parent can interrupt the run at a known point.
  next_batch = train_data.BatchIterator.next

  def slow_next(self, rows=None):
    time.sleep(0.25)
    return next_batch(self, rows)

  train_data.BatchIterator.next = slow_next
  config = helpers.small_config(method="lora", steps=STEPS,
                                **{"lora.rank": 4, "lora.dropout": 0.1})
  config.checkpoint.every = 2
  mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
  rows = {"en": helpers.math_rows(40), "translated": helpers.math_rows(30, "de", seed=1)}
  result = train.train(model, helpers.ByteTokenizer(), "mgsm", rows, config, workdir, mesh)
  print(f"RESULT {result.step} {result.preempted}", flush=True)


def _start(model, workdir, cache):
  """Starts a run; its output goes to a log file next to the cache (no pipe to fill up)."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  log_path = f"{cache}.{time.time_ns()}.log"
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_train_resume", str(model),
                             str(workdir)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
  proc.log_path = log_path
  return proc


def _output(proc) -> str:
  with open(proc.log_path, encoding="utf-8") as f:
    return f.read()


def _wait_for_step(proc, metrics, step, timeout=120):
  """Waits until a metrics row for `step` (or later) is appended after the current rows."""
  before = len(read_metrics(metrics)) if os.path.exists(metrics) else 0
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(metrics):
      rows = read_metrics(metrics)[before:]
      if rows and rows[-1]["step"] >= step:
        return rows[-1]["step"]
    if proc.poll() is not None:
      pytest.fail(f"run ended early:\n{_output(proc)[-3000:]}")
    time.sleep(0.02)
  proc.kill()
  pytest.fail(f"no step {step} within {timeout}s")


def _finish(proc, timeout=180):
  proc.wait(timeout=timeout)
  out = _output(proc)
  assert proc.returncode == 0, out[-3000:]
  return [line for line in out.splitlines() if line.startswith("RESULT")][-1].split()[1:]


def test_kill_sigterm_resume_reproduces_uninterrupted_run(tmp_path_factory):
  from tests import hf_tiny  # pylint: disable=g-import-not-at-top
  model = hf_tiny.tmp_model(tmp_path_factory, "llama_gqa")
  tmp = tmp_path_factory.mktemp("resume")
  cache = tmp / "jax_cache"
  ref_dir, run_dir = tmp / "reference", tmp / "interrupted"
  metrics = str(run_dir / "train" / "metrics.jsonl")

  assert _finish(_start(model, ref_dir, cache)) == [str(STEPS), "False"]
  reference = {r["step"]: r for r in read_metrics(ref_dir / "train" / "metrics.jsonl")}
  assert sorted(reference) == list(range(1, STEPS + 1))

  proc = _start(model, run_dir, cache)  # 1. SIGKILL (maybe in the middle of a save).
  _wait_for_step(proc, metrics, 5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()

  proc = _start(model, run_dir, cache)  # 2. Resume, then SIGTERM: save and exit cleanly.
  at = _wait_for_step(proc, metrics, 9)
  proc.send_signal(signal.SIGTERM)
  step, preempted = _finish(proc)
  assert preempted == "True" and at <= int(step) < STEPS
  assert os.path.isdir(run_dir / "checkpoints" / step), os.listdir(run_dir / "checkpoints")

  assert _finish(_start(model, run_dir, cache)) == [str(STEPS), "False"]  # 3. To the end.
  rows = read_metrics(metrics)
  # Steps retrained after the kill are logged once: the log is rewound to the restored step.
  assert [r["step"] for r in rows] == sorted(reference)
  for r in rows:
    want = reference[r["step"]]
    assert (r["loss"], r["grad_norm"], r["lr"]) == (want["loss"], want["grad_norm"], want["lr"]), r
  # The TensorBoard events beside the log hold the same rows, each step once, in one file.
  assert [os.path.basename(p) for p in glob.glob(str(run_dir / "train" / "*tfevents*"))] == [
      tensorboard.FILE_NAME]
  events = tensorboard.EventFile(run_dir / "train").scalars()
  assert [step for step, _, _ in events] == [r["step"] for r in rows]
  for (_, _, values), r in zip(events, rows):
    assert values == {k: float(np.float32(v)) for k, v in tensorboard.train_scalars(r).items()}


if __name__ == "__main__":
  _child(*sys.argv[1:3])
