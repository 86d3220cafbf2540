"""Train-step speed: stt_jax's jitted step vs transformers+torch AdamW, same weights and batch.

    python benchmarks/train.py                      # ~100M random Llama, fp32, batch 4 x 256
    python benchmarks/train.py --steps 8 --batch 4 --seq 256

Both sides do the same work per step: forward, target-token cross-entropy, backward, global
norm clipping and AdamW with a schedule. Each side runs in its own subprocess (so peak RSS is
its own), warms up, then times `--steps` steps (median step time; with `--rounds N` the sides
alternate N times and each keeps its best run). Prints a table (steps/s, tokens/s, peak RSS,
ratio), the step's FLOPs (formula and XLA's count) and the MFU it implies, and writes JSON to
benchmarks/results/train_<platform>.json. Not a test: timings never gate CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LLAMA100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 max_position_embeddings=1024)
LR, WARMUP, CLIP, DECAY = 1e-4, 2, 1.0, 0.01


def lr_at(step: int, total: int) -> float:
  """optax.warmup_cosine_decay_schedule(0, LR, WARMUP, total, 0.1 * LR) in plain Python, so
  torch follows the same learning rates as our default config."""
  if step < WARMUP:
    return LR * step / WARMUP
  frac = min(step - WARMUP, total - WARMUP) / (total - WARMUP)
  return 0.1 * LR + 0.9 * LR * 0.5 * (1 + math.cos(math.pi * frac))


def make_model(out_dir: str) -> str:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(
      transformers.LlamaConfig(**LLAMA100M)).save_pretrained(out_dir)
  return out_dir


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0):
  """Random tokens; the first quarter of each row is 'prompt' (no loss), like SFT data."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from stt_jax import train_data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(batch, seq + 1)).astype(np.int32)
  mask = np.zeros((batch, seq), np.int32)
  mask[:, seq // 4:] = 1
  return train_data.Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask,
                          segment_ids=np.ones((batch, seq), np.int32),
                          positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)))


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(folder: str, args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from stt_jax import flops, run_config, sharding, train  # pylint: disable=g-import-not-at-top
  from stt_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top

  config = run_config.get_config()
  t = config.train
  t.method, t.dtype, t.param_dtype = "full", args.dtype, "float32"
  t.batch_size, t.seq_len, t.lr, t.warmup_steps, t.clip_norm = args.batch, args.seq, LR, \
      WARMUP, CLIP
  t.weight_decay = DECAY
  run_config.validate(config)
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  model = train._prepare_model(folder, t, mesh)  # pylint: disable=protected-access
  trainer = train.Trainer(model, t, mesh, total_steps=args.warmup + args.steps)
  del model
  state = trainer.init_state()
  batch = trainer.device_batch(make_batch(args.batch, args.seq, LLAMA100M["vocab_size"]))
  compiled = trainer.step_fn.lower(state, trainer.frozen, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  times, cpu, losses = [], [], []
  for i in range(args.warmup + args.steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
  cfg = ModelConfig.from_hf(folder)
  return {"step_s": sorted(times)[len(times) // 2], "times": times,
          "cpu_s": sorted(cpu)[len(cpu) // 2], "losses": losses, "peak_rss_mb": peak_rss_mb(),
          "xla_flops": float(cost.get("flops", 0.0)) if cost else None,
          "model_flops_per_token": flops.flops_per_token(cfg, args.seq, "full"),
          "params": cfg.num_params()}


def torch_adamw(model, fused: bool = True):
  """torch AdamW with our decay rule (matrices only); fused: one kernel pass per parameter
  (torch's fastest AdamW on CPU and CUDA)."""
  import torch  # pylint: disable=g-import-not-at-top
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
  return torch.optim.AdamW([{"params": decay, "weight_decay": DECAY},
                            {"params": no_decay, "weight_decay": 0.0}], lr=LR, fused=fused)


def torch_step_fn(model, opt, sched, batch, dtype, device: str = "cpu"):
  """One transformers training step on `batch` (a train_data.Batch): forward under autocast
  to `dtype` (off for float32), target-token cross-entropy in float32, backward, global-norm
  clipping, AdamW, schedule. Returns a function that runs it and returns the loss."""
  import torch  # pylint: disable=g-import-not-at-top
  ids = torch.as_tensor(batch.inputs, dtype=torch.long, device=device)
  targets = torch.as_tensor(batch.targets, dtype=torch.long, device=device)
  mask = torch.as_tensor(batch.loss_mask, dtype=torch.float32, device=device)
  device_type = torch.device(device).type

  def step():
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
      logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets,
                                            reduction="none")
    loss = (nll * mask).sum() / mask.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    sched.step()
    return loss.item()

  return step


def run_torch(folder: str, args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  model.train()
  opt = torch_adamw(model)
  total = args.warmup + args.steps
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total) / LR)
  step = torch_step_fn(model, opt, sched,
                       make_batch(args.batch, args.seq, LLAMA100M["vocab_size"]), dtype)

  times, cpu, losses = [], [], []
  for i in range(args.warmup + args.steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    losses.append(step())
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
  attn = model.config._attn_implementation  # pylint: disable=protected-access
  return {"step_s": sorted(times)[len(times) // 2], "times": times,
          "cpu_s": sorted(cpu)[len(cpu) // 2], "losses": losses, "peak_rss_mb": peak_rss_mb(),
          "attn": attn}


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """Best fp32 matmul FLOP/s of this host through XLA: a practical CPU 'peak'."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best


def child(side: str, folder: str, args) -> None:
  out = run_ours(folder, args) if side == "ours" else run_torch(folder, args)
  if side == "ours":
    out["matmul_peak_flops"] = matmul_peak_flops()
  print("JSON " + json.dumps(out), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--rounds", type=int, default=1, help="runs per side; the best is kept")
  parser.add_argument("--out", default=None)
  parser.add_argument("--child", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child[0], args.child[1], args)
    return
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    folder = make_model(os.path.join(tmp, "llama100m"))
    for _ in range(args.rounds):  # Alternating sides evens out load from other processes.
      for side in ("torch", "ours"):
        cmd = [sys.executable, __file__, "--child", side, folder] + [
            f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "steps", "warmup", "dtype",
                                                  "threads")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON ")]
        if proc.returncode or not lines:
          raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
        run = json.loads(lines[-1][5:])
        if side not in results or run["step_s"] < results[side]["step_s"]:
          results[side] = run
  report(results, args)


def report(results: dict, args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  tokens = args.batch * args.seq
  ours, ref = results["ours"], results["torch"]
  for r in (ours, ref):
    r["steps_per_s"] = 1.0 / r["step_s"]
    r["tokens_per_s"] = tokens / r["step_s"]
  ratio = ours["tokens_per_s"] / ref["tokens_per_s"]
  cpu_ratio = ref["cpu_s"] / ours["cpu_s"]
  loss_diff = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], ref["losses"]))
  step_flops = ours["model_flops_per_token"] * tokens
  achieved = step_flops / ours["step_s"]
  tpu_peak = 197e12  # TPU v5e, bf16 dense.
  summary = {
      "model": "llama ~100M (random)", "params": ours["params"], "batch": args.batch,
      "seq": args.seq, "dtype": args.dtype, "threads": args.threads,
      "jax": jax.__version__, "torch": torch.__version__, "ours": ours, "torch_ref": ref,
      "ratio_tokens_per_s": ratio, "ratio_cpu_time": cpu_ratio, "max_rel_loss_diff": loss_diff,
      "model_flops_per_step": step_flops,
      "xla_flops_per_step": ours["xla_flops"], "achieved_flops": achieved,
      "cpu_matmul_peak_flops": ours["matmul_peak_flops"],
      "mfu_vs_cpu_matmul_peak": achieved / ours["matmul_peak_flops"],
      "tpu_v5e_step_ms_at_50pct_mfu": 1e3 * step_flops / (0.5 * tpu_peak),
  }
  print(f"\n{'':8} {'step s':>8} {'CPU s':>7} {'steps/s':>8} {'tokens/s':>9} "
        f"{'peak RSS MB':>12}")
  for name, r in (("stt_jax", ours), ("torch", ref)):
    print(f"{name:8} {r['step_s']:8.3f} {r['cpu_s']:7.2f} {r['steps_per_s']:8.2f} "
          f"{r['tokens_per_s']:9.0f} {r['peak_rss_mb']:12.0f}")
  print(f"ratio (ours / torch tokens/s): {ratio:.2f}x  [{args.threads} threads, {args.dtype}, "
        f"batch {args.batch}x{args.seq}]; by CPU time per step {cpu_ratio:.2f}x; same losses "
        f"step by step (max rel. diff "
        f"{loss_diff:.1e}: {ours['losses'][0]:.4f} -> {ours['losses'][-1]:.4f})")
  print(f"FLOPs/step: model formula {step_flops / 1e9:.1f} G, XLA count "
        f"{(ours['xla_flops'] or 0) / 1e9:.1f} G; achieved {achieved / 1e9:.1f} GFLOP/s = "
        f"{summary['mfu_vs_cpu_matmul_peak']:.0%} of this CPU's fp32 matmul peak "
        f"({ours['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)")
  print(f"on a TPU v5e (197 TFLOP/s bf16) this step is {step_flops / 1e12:.2f} TFLOP: "
        f"{summary['tpu_v5e_step_ms_at_50pct_mfu']:.1f} ms per step at 50% MFU")
  out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                 f"train_{jax.devices()[0].platform}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
