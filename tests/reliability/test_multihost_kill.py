"""kill -9 of one process of a 2-process run (JAX's gloo collectives on one machine): the other
must end with one error line, not hang; rerunning both finishes with the outputs of an
uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tests.reliability import harness

pytestmark = pytest.mark.faults


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: str, model: str) -> list[subprocess.Popen]:
  """Train + eval as 2 processes x 1 CPU device: the 2-device mesh of the reference run."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = harness.env(STT_JAX_COORDINATOR=f"127.0.0.1:{port}", STT_JAX_NUM_PROCESSES="2",
                      STT_JAX_PROCESS_ID=str(i))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    cmd = [sys.executable, "-m", "stt_jax.main", "--config=configs/tiny.py",
           f"--workdir={workdir}", f"--config.model.path={model}",
           "--config.stages=('train','eval')", *harness.COMMON]
    procs.append(subprocess.Popen(cmd, cwd=harness.ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _first_logged_step(workdir: str, procs, timeout: float = 400) -> None:
  path = os.path.join(workdir, "runs", "zero_shot", "train", "metrics.jsonl")
  end = time.time() + timeout
  while time.time() < end and not (os.path.exists(path) and os.path.getsize(path)):
    assert all(p.poll() is None for p in procs), "a process ended before training"
    time.sleep(0.2)
  assert os.path.getsize(path), "training did not log a step in time"


def _left_running(workdir: str) -> list[int]:
  return [p.pid for p in psutil.process_iter(["cmdline"])
          if any(workdir in a for a in (p.info["cmdline"] or []))]


# Victim 0 hosts JAX's coordination service: the survivor is aborted from C++ (the supervisor
# process writes the line). Victim 1: the survivor's next collective fails in Python.
@pytest.mark.parametrize("victim", [0, 1])
def test_kill_one_of_two_processes_mid_train(victim, reference, tiny_model, tmp_path):
  workdir = str(tmp_path / "run")
  harness.prepare(reference["workdir"], workdir, "train")  # Translated already.
  procs = _start(workdir, tiny_model)
  try:
    _first_logged_step(workdir, procs)
    procs[victim].send_signal(signal.SIGKILL)
    start = time.time()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=300)  # Hanging fails here.
    waited = time.time() - start
  finally:
    for p in procs:
      p.kill()
      p.communicate()
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert survivor.returncode == 1, err[-3000:]
  assert lines[-1].startswith("error: process") and "rerun the same command on every host" in (
      lines[-1]), lines[-3:]
  time.sleep(1)
  assert not _left_running(workdir), "the killed process's worker outlived it"
  harness.record("multihost_kill", victim=victim, survivor_exit_s=round(waited, 1))
  if victim == 1:
    return
  procs = _start(workdir, tiny_model)  # The same command on both hosts again.
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
  got, want = harness.train_outputs(workdir), reference["outputs"]["train"]
  for variant in harness.VARIANTS:
    assert got[variant]["steps"] == want[variant]["steps"], variant
    assert got[variant]["leftovers"] == [], variant
    np.testing.assert_allclose([r["loss"] for r in got[variant]["rows"]],
                               [r["loss"] for r in want[variant]["rows"]], rtol=1e-5)
  got, want = harness.eval_outputs(workdir), reference["outputs"]["eval"]
  key = lambda r: (r["variant"], r["step"], r["lang"], r["metric"])
  assert sorted(map(key, got["rows"])) == sorted(map(key, want["rows"]))  # Each once.
  values = lambda rows: [r["value"] for r in sorted(rows, key=key)]
  np.testing.assert_allclose(values(got["rows"]), values(want["rows"]), rtol=1e-6)
