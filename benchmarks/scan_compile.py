"""Compile time of scanned vs unrolled layers (model.scan_layers), one process.

    python benchmarks/scan_compile.py                 # the 24-layer Qwen2.5-0.5B demo model
    python benchmarks/scan_compile.py --no-train      # decode bucket only

Times lower + compile (wall seconds) of one decode bucket (`decode._decode_batch` as a
`Decoder` calls it: batch 8, prompt 64, max_new 32, greedy, no shared prefix) for the model
loaded with `load_hf(scan_layers=True)` and with `scan_layers=False`, then (unless --no-train)
of one full fine-tuning train step (`Trainer.step_fn`, batch 1 x --seq tokens, remat on).
Decode compiles are the best of --repeats (the machine may be shared). Prints a table and
the unrolled / scanned ratio. The decode bucket is also compiled for a
2-layer build of the same model (abstract weights; 2 so the scan stays a loop): roughly what
does not depend on the depth (embedding, logits, sampling, stop automata, the decode loop),
so the table shows the depth-dependent part of each compile and its ratio too. The persistent compilation cache is off so
every compile is real. Writes JSON to benchmarks/results/scan_compile_<platform>.json. Not a
test: timings never gate CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from stt_jax import decode, run_config, sharding, train  # noqa: E402
from stt_jax.models import CausalLM, load_hf  # noqa: E402
from stt_jax.models.fetch_demo import default_cache_dir  # noqa: E402

BATCH, PROMPT, NEW = 8, 64, 32


def decode_compile_seconds(model, repeats: int = 1) -> float:
  """lower + compile of the decode bucket a Decoder(batch_size=8) runs for 64-token prompts
  (the best of `repeats`, caches cleared before each)."""
  dec = decode.Decoder(model, batch_size=BATCH)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(10, 1000, PROMPT)) for _ in range(BATCH)]
  ids, mask = decode.left_pad(prompts, PROMPT, rows=BATCH)
  prefix, prefix_mask = decode.left_pad([[]], 0)
  stop = decode.StopCriteria.build(model.config.vocab_size)
  sampling = decode.Sampling()
  args = (dec.graphdef, dec.state, jnp.asarray(prefix), jnp.asarray(prefix_mask),
          jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
          jnp.float32(1e-6), jnp.float32(1.0), jnp.asarray(stop.token_mask),
          jnp.asarray(stop.sequences), jnp.asarray(stop.table))
  best = float("inf")
  for _ in range(repeats):
    jax.clear_caches()
    t = time.perf_counter()
    decode._decode_batch.lower(  # pylint: disable=protected-access
        *args, max_new_tokens=NEW, greedy=sampling.greedy, top_k=sampling.top_k).compile()
    best = min(best, time.perf_counter() - t)
  return best


def train_compile_seconds(folder: str, scan: bool, seq: int) -> float:
  """lower + compile of one full fine-tuning step (float32, remat) on abstract inputs."""
  cfg = run_config.get_config()
  t = cfg.train
  t.method, t.dtype, t.param_dtype = "full", "float32", "float32"
  t.batch_size, t.grad_accum, t.seq_len, t.remat = 1, 1, seq, True
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  model = train._prepare_model(folder, t, mesh, scan=scan)  # pylint: disable=protected-access
  trainer = train.Trainer(model, t, mesh, total_steps=10)
  del model
  batch = {k: jax.ShapeDtypeStruct((1, 1, seq), jnp.int32, sharding=trainer.batch_sharding)
           for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  start = time.perf_counter()
  trainer.step_fn.lower(trainer.abstract_state(), trainer.frozen, batch).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--folder", default=None)
  parser.add_argument("--no-train", action="store_true")
  parser.add_argument("--seq", type=int, default=128, help="train step tokens per row")
  parser.add_argument("--repeats", type=int, default=3, help="decode compiles (best of)")
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  folder = args.folder or os.fspath(default_cache_dir())
  jax.jit(lambda x: x + 1).lower(1.0).compile()  # Backend start-up outside the timings.
  rows = {}
  for scan in (True, False):
    model, config = load_hf(folder, dtype="float32", scan_layers=scan)
    rows[scan] = {"decode": decode_compile_seconds(model, args.repeats)}
    del model
    gc.collect()
    two = dataclasses.replace(config, num_hidden_layers=2, sliding_windows=None)
    rows[scan]["decode_2_layers"] = decode_compile_seconds(
        nnx.eval_shape(lambda c=two, s=scan: CausalLM(c, scan_layers=s)), args.repeats)
    rows[scan]["decode_depth_part"] = rows[scan]["decode"] - rows[scan]["decode_2_layers"]
    print(f"scan_layers={scan}: decode bucket compiled in {rows[scan]['decode']:.1f}s "
          f"(2-layer build: {rows[scan]['decode_2_layers']:.1f}s)", flush=True)
  if not args.no_train:
    for scan in (True, False):
      rows[scan]["train"] = train_compile_seconds(folder, scan, args.seq)
      gc.collect()
      print(f"scan_layers={scan}: train step compiled in {rows[scan]['train']:.1f}s",
            flush=True)
  kinds = list(rows[True])
  print(f"\n{config.architecture}, {config.num_hidden_layers} layers, "
        f"{jax.devices()[0].platform}; lower+compile wall seconds")
  print(f"{'':24s}{'scanned':>10s}{'unrolled':>10s}{'ratio':>8s}")
  labels = {"decode": f"decode b{BATCH} p{PROMPT} n{NEW}",
            "decode_2_layers": "  same, 2-layer build",
            "decode_depth_part": "  24 - 2 layers",
            "train": f"train step 1x{args.seq} remat"}
  for k in kinds:
    s, u = rows[True][k], rows[False][k]
    ratio = f"{u / s:7.1f}x" if s > 0.05 else "      -"
    print(f"{labels[k]:24s}{s:10.1f}{u:10.1f}{ratio}")
  out = {"model": folder, "layers": config.num_hidden_layers,
         "platform": jax.devices()[0].platform,
         "scanned": rows[True], "unrolled": rows[False],
         "ratio": {k: rows[False][k] / rows[True][k] for k in kinds if rows[True][k] > 0.05}}
  os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
  path = os.path.join(os.path.dirname(__file__), "results",
                      f"scan_compile_{jax.devices()[0].platform}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
