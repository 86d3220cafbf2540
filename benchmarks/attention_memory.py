"""Peak memory of one training step per attention implementation (model.attention).

    python benchmarks/attention_memory.py                 # compiled memory, every case
    python benchmarks/attention_memory.py --run einsum,xla   # + peak RSS of a real step

A random Llama-shaped model (hidden 768, 12 layers, 12 heads, vocab 32000: 134M parameters),
one loss-and-gradient step (the trainer's loss, stt_jax.loss.token_loss_sum, on a packed row
of `--seq-len` tokens), remat off and on. Each case is compiled from abstract shapes (no
weights are allocated) and reports XLA's buffer assignment (`compiled.memory_analysis()`:
temp + arguments + outputs, aliasing subtracted). With `--run`, the named implementations
also run one step each in a fresh subprocess and report its peak resident memory (ru_maxrss).
`splash_interpret` is the TPU kernel interpreted on CPU: its memory plan is the kernel's
(blocks, no [L, L] scores), its speed is not. Writes
benchmarks/results/attention_memory_<platform>_<dtype>_b<batch>.json.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from stt_jax import loss  # noqa: E402
from stt_jax.models.config import ModelConfig  # noqa: E402
from stt_jax.models.decoder import CausalLM  # noqa: E402

CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=768,
                     intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=12, head_dim=64)
MiB = 2**20


def _batch(batch: int, seq_len: int, abstract: bool):
  """A packed batch: two sequences per row (segments 1 and 2), targets everywhere."""
  shapes = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
            for k in ("inputs", "targets", "positions", "segment_ids")}
  shapes["loss_mask"] = jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)
  if abstract:
    return shapes
  rng = np.random.default_rng(0)
  half = seq_len // 2
  seg = np.repeat([[1] * half + [2] * (seq_len - half)], batch, axis=0).astype(np.int32)
  pos = np.concatenate([np.arange(half), np.arange(seq_len - half)])
  return {"inputs": jnp.asarray(rng.integers(3, CONFIG.vocab_size, (batch, seq_len)), jnp.int32),
          "targets": jnp.asarray(rng.integers(3, CONFIG.vocab_size, (batch, seq_len)),
                                 jnp.int32),
          "positions": jnp.asarray(np.broadcast_to(pos, (batch, seq_len)), jnp.int32),
          "segment_ids": jnp.asarray(seg), "loss_mask": jnp.ones((batch, seq_len), jnp.float32)}


def _step(impl: str, dtype, remat: bool, abstract: bool):
  """(jitted loss-and-grads fn, params, rest) of the model under `impl`."""
  build = lambda: CausalLM(CONFIG, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                           attention=impl)
  model = nnx.eval_shape(build) if abstract else build()
  model.remat = remat
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def fn(params, rest, batch):
    def f(params):
      total, count = loss.token_loss_sum(nnx.merge(graphdef, params, rest), batch)
      return total / count
    return jax.value_and_grad(f)(params)

  return fn, params, rest


def compiled_memory(impl: str, dtype, remat: bool, batch: int, seq_len: int) -> dict:
  fn, params, rest = _step(impl, dtype, remat, abstract=True)
  t0 = time.perf_counter()
  compiled = fn.lower(params, rest, _batch(batch, seq_len, abstract=True)).compile()
  m = compiled.memory_analysis()
  total = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
           - m.alias_size_in_bytes)
  return {"temp_mib": m.temp_size_in_bytes / MiB, "argument_mib": m.argument_size_in_bytes / MiB,
          "output_mib": m.output_size_in_bytes / MiB, "total_mib": total / MiB,
          "compile_s": time.perf_counter() - t0}


def run_once(impl: str, dtype, remat: bool, batch: int, seq_len: int) -> dict:
  """One real step in this process (called in a fresh subprocess): peak RSS and step time."""
  fn, params, rest = _step(impl, dtype, remat, abstract=False)
  data = _batch(batch, seq_len, abstract=False)
  t0 = time.perf_counter()
  value, _ = jax.block_until_ready(fn(params, rest, data))
  return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "first_step_s": time.perf_counter() - t0, "loss": float(value)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--impls", default="einsum,xla,splash_interpret")
  parser.add_argument("--run", default="", help="implementations to also run (peak RSS)")
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", default="off,on")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  if args.child:  # impl:remat
    impl, remat = args.child.split(":")
    print(json.dumps(run_once(impl, dtype, remat == "on", args.batch, args.seq_len)))
    return
  rows = []
  for impl in args.impls.split(","):
    for remat in args.remat.split(","):
      row = {"impl": impl, "remat": remat, "dtype": args.dtype, "batch": args.batch,
             "seq_len": args.seq_len,
             **compiled_memory(impl, dtype, remat == "on", args.batch, args.seq_len)}
      if impl in args.run.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", f"{impl}:{remat}",
                              "--seq-len", str(args.seq_len), "--batch", str(args.batch),
                              "--dtype", args.dtype], capture_output=True, text=True,
                             check=True)
        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(f"\n| attention | remat | temp MiB | args+out MiB | total MiB | peak RSS MiB |")
  print("|---|---|---:|---:|---:|---:|")
  for r in rows:
    rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "-"
    print(f"| {r['impl']} | {r['remat']} | {r['temp_mib']:.0f} | "
          f"{r['argument_mib'] + r['output_mib']:.0f} | {r['total_mib']:.0f} | {rss} |")
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                     f"attention_memory_{jax.default_backend()}_{args.dtype}_b{args.batch}.json")
  with open(out, "w") as f:
    json.dump(rows, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
