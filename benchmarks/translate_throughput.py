"""Translation throughput: the continuous-batching engine vs the batch-synchronous engine the
translate stage used before, and transformers `generate`, on the same weights in one process.

    python benchmarks/translate_throughput.py                 # both workloads, 16 slots
    python benchmarks/translate_throughput.py --gsm8k 20 --xnli 128 --slots 16

Workloads (the 0.5B demo Qwen, float32): MultiNLI -> zh (the demo's segments: its first
`--xnli` English pairs, 8 shots) and GSM8K -> zh (the first `--gsm8k` questions and answers,
line by line). Each engine translates the same prompts with the same per-segment budgets the
translate stage gives them (the old engine: batches sorted by budget, each decoded to its
largest budget rounded up to a power of two, as it did; transformers: the same batches with
`stop_strings=["\\n"]`). Reported per engine: useful tokens/s (tokens up to and including the
newline or EOS), slot use (useful tokens / (slots x device decode steps)), programs compiled
and compile seconds (jax monitoring events), peak RSS so far, and the ratio to the old engine.
Writes JSON to benchmarks/results/translate_throughput_<platform>.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from stt_jax import decode, run_config  # noqa: E402
from stt_jax import translate as tl  # noqa: E402
from stt_jax.engine import Engine, kv_bytes  # noqa: E402
from stt_jax.models import load_hf  # noqa: E402
from stt_jax.stages.translate import english_rows  # noqa: E402
from stt_jax.tasks import get_task  # noqa: E402

_COMPILE = {"seconds": 0.0, "count": 0}


def _on_event(event: str, seconds: float, **_) -> None:
  if event.endswith("backend_compile_duration"):
    _COMPILE["seconds"] += seconds
    _COMPILE["count"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def workload(task_name: str, limit: int, slots: int, lang: str = "zh"):
  """(prompts, sources, budgets, translate section) of the stage's segments for `limit` rows."""
  cfg = run_config.get_config()  # The bundled data; the paper's token budgets per language.
  cfg.task.name, cfg.task.train_limit, cfg.task.allow_subset = task_name, limit, True
  cfg.task.train_sample_seed = None
  paper = run_config.paper_config(task_name, lang).translate
  t = cfg.translate
  t.max_new_tokens, t.max_new_ratio = paper.max_new_tokens, paper.max_new_ratio
  t.shots, t.batch_size, t.progress = 8, slots, False
  if task_name == "xnli":
    t.max_new_tokens = 128  # As configs/demo.py.
  task = get_task(task_name)
  rows = english_rows(cfg, task)
  segments = list(dict.fromkeys(
      s for r in rows for text in task.translatable_texts(r).values()
      for line in tl.split_field(text, t) for s in line))
  segments = [s for s in segments if tl.needs_decoding(s)]
  pairs, _ = tl.exemplars(t.exemplars[task.name], lang, t, cfg.task.data_dir)
  prompts = [tl.build_prompt(pairs, s, lang, t) for s in segments]
  return prompts, segments, t


def rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Meter:
  """Wall time, compiles and peak RSS of one engine's run."""

  def __enter__(self):
    self.start, self.c0 = time.perf_counter(), dict(_COMPILE)
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start
    self.compiles = _COMPILE["count"] - self.c0["count"]
    self.compile_s = _COMPILE["seconds"] - self.c0["seconds"]
    self.rss = rss_gib()


def useful(ids, eos_ids, newline_ids) -> int:
  """Tokens up to and including the first EOS or newline-bearing token."""
  for k, t in enumerate(ids):
    if t in eos_ids or t in newline_ids:
      return k + 1
  return len(ids)


def old_engine(model, tok, prompts, budgets, slots, crit):
  """The pre-engine translate path: batches sorted by (budget, prompt length), each decoded
  to its largest budget rounded up to a power of two (16 minimum)."""
  dec = decode.Decoder(model, batch_size=slots)
  ids = [tok.encode(p) for p in prompts]
  order = sorted(range(len(ids)), key=lambda i: (budgets[i], len(ids[i])))
  out, steps = {}, 0
  for k in range(0, len(order), slots):
    chunk = order[k:k + slots]
    budget = decode.next_pow2(max(budgets[i] for i in chunk), 16)
    got = dec.run_batch_stopped([ids[i] for i in chunk], budget, crit, decode.Sampling())
    for i, (o, _) in zip(chunk, got):
      out[i] = o
    steps += max(len(o) for o, _ in got)
  return out, steps * slots, len(dec.compiled)


def new_engine(model, tok, prompts, budgets, slots, crit, steps_per_call, prefill_chunk):
  eng = Engine(model, slots=slots, steps_per_call=steps_per_call, prefill_chunk=prefill_chunk)
  ids = [tok.encode(p) for p in prompts]
  out = {i: o for i, o, _ in eng.generate(ids, budgets, crit)}
  return out, eng.stats.device_steps * eng.slots, len(eng.compiled), eng


def hf_engine(hf, tok, prompts, budgets, slots):
  """transformers generate on the old engine's batches (left padded, stop at a newline)."""
  tok.padding_side = "left"
  order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i])))
  out, steps = {}, 0
  for k in range(0, len(order), slots):
    chunk = order[k:k + slots]
    enc = tok([prompts[i] for i in chunk], return_tensors="pt", padding=True)
    with torch.no_grad():
      gen = hf.generate(**enc, max_new_tokens=max(budgets[i] for i in chunk), do_sample=False,
                        stop_strings=["\n"], tokenizer=tok, pad_token_id=tok.pad_token_id)
    new = gen[:, enc["input_ids"].shape[1]:].tolist()
    for i, row in zip(chunk, new):
      out[i] = row
    steps += len(new[0])
  return out, steps * slots


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--xnli", type=int, default=128, help="MultiNLI pairs (the demo's 128)")
  parser.add_argument("--gsm8k", type=int, default=20, help="GSM8K questions")
  parser.add_argument("--slots", type=int, default=16)
  parser.add_argument("--steps_per_call", type=int, default=16)
  parser.add_argument("--prefill_chunk", type=int, default=128)
  parser.add_argument("--skip_hf", action="store_true")
  parser.add_argument("--unrolled", action="store_true", help="model.scan_layers=False")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  path = run_config.demo_model_path()
  model, config = load_hf(path, dtype="float32", layout="inference",
                          scan_layers=not args.unrolled)
  tok = transformers.AutoTokenizer.from_pretrained(path)
  hf = None if args.skip_hf else transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32).eval()
  crit = decode.stop_criteria(tok, config, ("\n",))
  newline_ids = {i for i in range(len(tok)) if "\n" in tok.decode([i])}
  eos_ids = set(crit.eos_ids)
  results = []
  for task_name, limit in (("xnli", args.xnli), ("mgsm", args.gsm8k)):
    if not limit:
      continue
    prompts, sources, t = workload(task_name, limit, args.slots)
    budgets = [tl.segment_budget(t, len(tok.encode(s, add_special_tokens=False)))
               for s in sources]
    print(f"\n{task_name}->zh: {len(prompts)} segments, budgets {min(budgets)}..{max(budgets)}",
          flush=True)
    runs = {}
    with Meter() as m:
      out, capacity, programs = old_engine(model, tok, prompts, budgets, args.slots, crit)
    runs["old engine"] = (out, capacity, programs, m)
    with Meter() as m:
      out, capacity, programs, eng = new_engine(model, tok, prompts, budgets, args.slots, crit,
                                                args.steps_per_call, args.prefill_chunk)
    runs["continuous"] = (out, capacity, programs, m)
    if hf is not None:
      with Meter() as m:
        out, capacity = hf_engine(hf, tok, prompts, budgets, args.slots)
      runs["transformers"] = (out, capacity, None, m)
    base = None
    for name, (out, capacity, programs, m) in runs.items():
      n_useful = sum(useful(out[i][:budgets[i]], eos_ids, newline_ids) for i in out)
      row = {"workload": f"{task_name}->zh", "engine": name, "segments": len(prompts),
             "useful_tokens": n_useful, "seconds": round(m.seconds, 1),
             "useful_tok_s": round(n_useful / m.seconds, 2),
             "slot_use": round(n_useful / max(capacity, 1), 3), "programs": programs,
             "compiles": m.compiles, "compile_s": round(m.compile_s, 1),
             "peak_rss_gib": round(m.rss, 2)}
      base = base or row["useful_tok_s"]
      row["vs_old"] = round(row["useful_tok_s"] / base, 2)
      results.append(row)
    same = sum(runs["old engine"][0][i] == runs["continuous"][0][i] for i in range(len(prompts)))
    print(f"greedy tokens identical (old vs continuous): {same}/{len(prompts)}")
    prefix = eng.prefix_len
    per_slot = eng.capacity
    results.append({"workload": f"{task_name}->zh", "engine": "kv bytes",
                    "prefix_tokens": prefix, "slot_capacity": per_slot,
                    "kv_bytes_prefix_per_slot": kv_bytes(config, args.slots,
                                                         prefix + per_slot, 0, np.float32),
                    "kv_bytes_prefix_once": kv_bytes(config, args.slots, per_slot, prefix,
                                                     np.float32),
                    "identical": same})
  header = ("workload", "engine", "segments", "useful_tokens", "seconds", "useful_tok_s",
            "vs_old", "slot_use", "programs", "compiles", "compile_s", "peak_rss_gib")
  print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for r in results:
    if r["engine"] != "kv bytes":
      print("| " + " | ".join(str(r.get(h, "")) for h in header) + " |")
  for r in results:
    if r["engine"] == "kv bytes":
      print(f"{r['workload']}: KV cache of {args.slots} slots, prefix {r['prefix_tokens']} + "
            f"{r['slot_capacity']} per slot: {r['kv_bytes_prefix_per_slot'] / 2**20:.1f} MiB "
            f"with the prefix in every slot, {r['kv_bytes_prefix_once'] / 2**20:.1f} MiB with "
            "it stored once")
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"translate_throughput_{jax.devices()[0].platform}.json")
  with open(out, "w") as f:
    json.dump({"jax": jax.__version__, "slots": args.slots,
               "steps_per_call": args.steps_per_call, "prefill_chunk": args.prefill_chunk,
               "scan_layers": not args.unrolled,
               "rows": results}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
