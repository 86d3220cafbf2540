"""Decode speed: stt_jax vs transformers+torch `generate` on the same weights, one process.

    python benchmarks/decode.py                       # ~100M random Llama + the 0.5B Qwen
    python benchmarks/decode.py --models llama100m --batches 1,8

Prints tokens/s for ours (the batch-synchronous Decoder and the continuous-batching Engine on
the same fixed-length work) and torch, the ratio, the machine's measured memory read bandwidth and batch-1
decode as a fraction of the bandwidth roofline (weight bytes per token / bandwidth). Writes
JSON to benchmarks/results/decode_<platform>.json. Not a test: timings never gate CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from stt_jax import decode  # noqa: E402
from stt_jax.engine import Engine  # noqa: E402
from stt_jax.models import load_hf  # noqa: E402
from stt_jax.models.fetch_demo import default_cache_dir  # noqa: E402

PROMPT, NEW = 200, 64


def bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
  """Best-of-n read bandwidth of a 1 GiB float32 array (numpy sum)."""
  a = np.ones(nbytes // 4, np.float32)
  a.sum()
  best = min(_timed(lambda: a.sum()) for _ in range(repeats))
  return nbytes / best / 1e9


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def make_llama100m(out_dir: str) -> str:
  cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                 num_hidden_layers=12, num_attention_heads=12,
                                 num_key_value_heads=12, max_position_embeddings=1024)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out_dir)
  return out_dir


def time_ours(model, prompts, batch: int, repeats: int) -> float:
  dec = decode.Decoder(model, batch_size=batch)
  crit = decode.StopCriteria.build(model.config.vocab_size)  # no EOS: always NEW tokens
  run = lambda: dec.run_batch(prompts, NEW, crit, decode.Sampling())
  out = run()  # compile + warm up at the measured shape
  assert all(len(o) == NEW for o in out)
  best = min(_timed(run) for _ in range(repeats))
  return batch * NEW / best


def time_engine(model, prompts, batch: int, repeats: int) -> float:
  """The continuous-batching engine on the same fixed-length work (batch slots, NEW tokens)."""
  eng = Engine(model, slots=batch, steps_per_call=NEW)
  crit = decode.StopCriteria.build(model.config.vocab_size)
  run = lambda: list(eng.generate(prompts, NEW, crit))
  out = run()
  assert all(len(o) == NEW for _, o, _ in out)
  best = min(_timed(run) for _ in range(repeats))
  return batch * NEW / best


def time_torch(model, prompts, repeats: int) -> float:
  ids = torch.tensor(prompts, dtype=torch.long)
  kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            attention_mask=torch.ones_like(ids), pad_token_id=0)
  with torch.no_grad():
    model.generate(ids, **kw)
    best = min(_timed(lambda: model.generate(ids, **kw)) for _ in range(repeats))
  return ids.shape[0] * NEW / best


def bench_model(name: str, folder: str, batches, repeats: int, bw: float) -> list[dict]:
  rows = []
  config_vocab = json.load(open(os.path.join(folder, "config.json")))["vocab_size"]
  rng = np.random.default_rng(0)
  ours, config = load_hf(folder, dtype="float32")
  hf32 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  hf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
  weight_bytes = 4 * config.num_params()
  for b in batches:
    prompts = rng.integers(10, min(config_vocab, 30000), size=(b, PROMPT)).tolist()
    r = {"model": name, "batch": b, "prompt": PROMPT, "new": NEW,
         "params": config.num_params()}
    r["ours_f32_tok_s"] = time_ours(ours, prompts, b, repeats)
    r["engine_f32_tok_s"] = time_engine(ours, prompts, b, repeats)
    r["torch_f32_tok_s"] = time_torch(hf32, prompts, repeats)
    r["torch_bf16_tok_s"] = time_torch(hf16, prompts, repeats)
    r["ratio_vs_torch_f32"] = r["ours_f32_tok_s"] / r["torch_f32_tok_s"]
    r["ratio_vs_torch_bf16"] = r["ours_f32_tok_s"] / r["torch_bf16_tok_s"]
    if b == 1:
      r["roofline_tok_s"] = bw * 1e9 / weight_bytes
      r["fraction_of_roofline"] = r["ours_f32_tok_s"] / r["roofline_tok_s"]
    rows.append(r)
    print(_fmt(r), flush=True)
  return rows


def _fmt(r: dict) -> str:
  roof = f"  roofline {r['fraction_of_roofline']:.0%}" if "fraction_of_roofline" in r else ""
  return (f"{r['model']:>10} b={r['batch']:<3} ours f32 {r['ours_f32_tok_s']:8.1f} tok/s | engine "
          f"{r['engine_f32_tok_s']:8.1f} | torch "
          f"f32 {r['torch_f32_tok_s']:8.1f} (x{r['ratio_vs_torch_f32']:.2f}) | torch bf16 "
          f"{r['torch_bf16_tok_s']:8.1f} (x{r['ratio_vs_torch_bf16']:.2f}){roof}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="llama100m,qwen0.5b")
  parser.add_argument("--batches", default="1,8,32")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  bw = bandwidth_gbs()
  print(f"memory read bandwidth: {bw:.1f} GB/s; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; torch {torch.__version__} ({torch.get_num_threads()} "
        "threads)", flush=True)
  batches = [int(b) for b in args.batches.split(",")]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      if name == "llama100m":
        folder = make_llama100m(os.path.join(tmp, name))
      elif name == "qwen0.5b":
        folder = default_cache_dir()
        if not os.path.isfile(os.path.join(folder, "config.json")):
          print(f"skip {name}: run `python -m stt_jax.models.fetch_demo` first")
          continue
      else:
        raise SystemExit(f"unknown model {name!r}; use llama100m, qwen0.5b")
      rows += bench_model(name, folder, batches, args.repeats, bw)
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"decode_{jax.devices()[0].platform}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"bandwidth_gbs": bw, "rows": rows}, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
