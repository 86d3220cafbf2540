"""Multi-host path on one machine: 2 processes x 2 CPU devices (gloo collectives) train the same
run as one process on 4 devices. Each process builds only its rows of the global batch
(`jax.make_array_from_process_local_data`); checkpoints and metrics are written once."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from stt_jax import sharding, train
from tests.test_train_helpers import ByteTokenizer, math_rows, read_metrics, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = {"data": 2, "fsdp": 2}


def _run(model, workdir, mesh):
  config = small_config(steps=4)
  return train.train(model, ByteTokenizer(), "mgsm", {"en": math_rows(40)}, config, workdir,
                     mesh)


def _child(process_id: str, port: str, model: str, workdir: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(process_id))
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  result = _run(model, workdir, sharding.make_mesh(MESH))
  print(f"RESULT {jax.process_index()} {result.step} {result.metrics['loss']!r}", flush=True)


def test_two_processes_equal_one(tmp_path_factory):
  from tests import hf_tiny  # pylint: disable=g-import-not-at-top
  model = hf_tiny.tmp_model(tmp_path_factory, "llama_gqa")
  tmp = tmp_path_factory.mktemp("multihost")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.test_train_multihost", str(i),
                             str(port), model, str(tmp / "multi")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  results = [[ln for ln in out.splitlines() if ln.startswith("RESULT")][-1].split()
             for out in outs]
  assert [r[2] for r in results] == ["4", "4"]

  single = _run(model, tmp / "single", sharding.make_mesh(MESH, jax.devices()[:4]))
  want = [r["loss"] for r in read_metrics(tmp / "single" / "train" / "metrics.jsonl")]
  got = [r["loss"] for r in read_metrics(tmp / "multi" / "train" / "metrics.jsonl")]
  assert len(got) == 4, "one writer: process 0"
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(float(results[1][3]), single.metrics["loss"], rtol=1e-5)
  assert sorted(os.listdir(tmp / "multi" / "checkpoints")) == ["2", "4"]


if __name__ == "__main__":
  _child(*sys.argv[1:5])
