"""Load time and peak host RAM of `load_hf` vs the checkpoint's size on disk.

    python benchmarks/load.py [--folder DIR] [--dtype bfloat16] [--mesh fsdp=8]

Runs in a fresh process so ru_maxrss is this load's peak. Reports the RSS before loading
(interpreter + jax) and the peak, and the ratio of the increase to the weights' bytes on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--folder", default=None)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--mesh", default="", help="e.g. fsdp=8 (needs that many devices)")
  args = parser.parse_args()
  if args.mesh:
    n = 1
    for kv in args.mesh.split(","):
      n *= int(kv.split("=")[1])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}")
  import jax  # noqa: F401  pylint: disable=g-import-not-at-top
  from stt_jax import sharding  # pylint: disable=g-import-not-at-top
  from stt_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  from stt_jax.models.fetch_demo import default_cache_dir  # pylint: disable=g-import-not-at-top
  folder = args.folder or os.fspath(default_cache_dir())
  disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
             if f.endswith(".safetensors"))
  mesh = None
  if args.mesh:
    mesh = sharding.make_mesh({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
  before = rss_mb()
  t = time.perf_counter()
  model, config = load_hf(folder, mesh=mesh, dtype=args.dtype)
  seconds = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  out = {"folder": folder, "dtype": args.dtype, "mesh": args.mesh or None,
         "disk_mb": disk / 2**20, "params": config.num_params(), "load_s": seconds,
         "rss_before_mb": before, "peak_rss_mb": peak,
         "peak_over_disk": peak / (disk / 2**20),
         "increase_over_disk": (peak - before) / (disk / 2**20)}
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
