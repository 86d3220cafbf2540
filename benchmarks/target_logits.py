"""Target-only logits: the loss's LM head at every position vs at target positions only.

    python benchmarks/target_logits.py            # 0.5B demo Qwen, LoRA as configs/demo.py

One jitted loss-and-gradient step (forward, loss, backward; the optimizer is the same either
way) on real packed batches of two shapes: MultiNLI (long prompt, 2 target tokens: the label
and EOS) and GSM8K (the rationale is the target). Each width runs `--rounds` times,
alternating, and keeps its best median. Prints the table and the ratio; writes JSON to
benchmarks/results/target_logits_<platform>.json. Not a test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from stt_jax import run_config, train, train_data  # noqa: E402
from stt_jax.models import load_hf, lora  # noqa: E402
from stt_jax.stages.translate import english_rows  # noqa: E402
from stt_jax.tasks import get_task  # noqa: E402


def batches(task_name: str, tok, batch: int, seq_len: int, n: int):
  """`n` packed batches [1, batch, seq_len] of the task's English training rows."""
  cfg = run_config.get_config()
  cfg.task.name, cfg.task.train_limit, cfg.task.allow_subset = task_name, 400, True
  cfg.task.train_sample_seed = None
  task = get_task(task_name)
  examples = train_data.tokenize(task, {"en": english_rows(cfg, task)}, tok, seq_len)
  it = train_data.BatchIterator(examples, batch_size=batch, seq_len=seq_len, packing=True,
                                weights={"en": 1.0}, seed=0)
  out = [{k: jnp.asarray(v[None]) for k, v in it.next().arrays().items()} for _ in range(n)]
  return out, examples.target_width(seq_len)


def time_step(fn, params, frozen, data, steps: int) -> float:
  key = jnp.zeros((2,), jnp.uint32)
  jax.block_until_ready(fn(params, frozen, data[0], key))  # Compile and warm up.
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, frozen, data[i % len(data)], key))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  path = run_config.demo_model_path()
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model, _ = load_hf(path, dtype="float32", scan_layers=False)
  lora.apply_lora(model, rank=16, alpha=32.0, dropout=0.0,
                  targets=run_config.get_config().train.lora.targets)
  graphdef, params, frozen = train.split_trainable(model, "lora")
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  rows = []
  for task_name in ("xnli", "mgsm"):
    data, width = batches(task_name, tok, args.batch, args.seq, args.steps)
    targets = float(np.mean([np.sum(d["loss_mask"]) for d in data])) / args.batch
    fns = {w: jax.jit(functools.partial(train.loss_and_grads, graphdef=graphdef,
                                        target_width=w)) for w in (None, width)}
    best = {w: float("inf") for w in fns}
    for _ in range(args.rounds):
      for w, fn in fns.items():
        best[w] = min(best[w], time_step(fn, params, frozen, data, args.steps))
    row = {"workload": task_name, "batch": args.batch, "seq_len": args.seq,
           "targets_per_row": round(targets, 1), "target_width": width,
           "all_positions_s": round(best[None], 3), "target_only_s": round(best[width], 3),
           "speedup": round(best[None] / best[width], 3)}
    rows.append(row)
    print(row, flush=True)
  print("\n| workload | targets/row | width | all positions s/step | target-only s/step | "
        "speed-up |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['workload']} | {r['targets_per_row']} | {r['target_width']} of {r['seq_len']}"
          f" | {r['all_positions_s']} | {r['target_only_s']} | {r['speedup']}× |")
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"target_logits_{jax.devices()[0].platform}.json")
  with open(out, "w") as f:
    json.dump({"jax": jax.__version__, "model": "qwen2.5-coder-0.5b-instruct", "method": "lora",
               "rows": rows}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
