"""Self-translation quality and throughput of real models, side by side (default: the demo
0.5B Qwen; `--model` again for each further model, e.g. Gemma 3 270M).

1. quality_report: chrF/BLEU against human translations, per language, on held-out XNLI dev
   sentences (8-shot XNLI prompt) and on the MGSM exemplar questions (leave-one-out).
2. Tokens per character of each model's tokenizer on the human translations (th/zh cost the
   most: the token budgets of config.translate/train/eval scale with it).
3. translate_task on the first GSM8K train questions (question + rationale, line by line):
   measured throughput, extrapolated to 1,000 questions.

  python benchmarks/translate_quality.py [--model DIR [--model DIR2 ...]] [--langs de,ru,th,zh]
      [--n 100] [--gsm8k 25] [--gsm8k-lang zh] [--batch-size 8] [--dtype float32]

Each model runs in turn in this one process, on the same sentences and prompts. Writes
benchmarks/results/translate_quality.json and .md (markdown tables).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", action="append", default=None,
                 help="HF model folder; repeat to compare models (default: the demo Qwen)")
  p.add_argument("--langs", default="de,ru,th,zh")
  p.add_argument("--n", type=int, default=100, help="held-out XNLI sentences per language")
  p.add_argument("--no-mgsm-loo", action="store_true", help="skip MGSM leave-one-out")
  p.add_argument("--gsm8k", type=int, default=25, help="GSM8K questions to time (0 = skip)")
  p.add_argument("--gsm8k-lang", default="zh")
  p.add_argument("--shots", type=int, default=8)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--append", action="store_true",
                 help="keep the other models already in --out (same --langs/--n/--shots)")
  p.add_argument("--note", default="", help="a line for the report (load, conditions)")
  p.add_argument("--out", default=str(RESULTS / "translate_quality.json"))
  return p.parse_args()


def gsm8k_throughput(model, tokenizer, cfg, args) -> dict:
  """Times translate_task on `args.gsm8k` GSM8K questions; extrapolates to 1,000."""
  from stt_jax.stages import translate as stage  # pylint: disable=g-import-not-at-top
  cfg.task.train_limit = args.gsm8k
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    stats = stage.translate_task(model, tokenizer, "mgsm", args.gsm8k_lang, cfg, workdir)
    wall = time.perf_counter() - start
  thr = stats["throughput"]
  seg_per_q = stats["segments"]["decode"] / max(stats["items"], 1)
  per_q = thr["decode_s"] / max(stats["items"], 1)
  return {"lang": args.gsm8k_lang, "questions": stats["items"], "kept": stats["kept"],
          "dropped": stats["dropped"], "segments_decoded": thr["decoded_segments"],
          "segments_per_question": round(seg_per_q, 2), "wall_s": round(wall, 1), **thr,
          "s_per_question": round(per_q, 2),
          "extrapolated_1000_questions_h": round(1000 * per_q / 3600, 2),
          "rejected_samples": stats.get("rejected_samples", {})}


def tokens_per_char(tokenizer, langs, n: int, cfg) -> dict[str, float]:
  """Tokens per character (no special tokens) on the first `n` held-out XNLI dev sentences:
  the English sources under "en", the human translations under each language."""
  from stt_jax.translate import exemplars  # pylint: disable=g-import-not-at-top
  texts = {}
  for lang in langs:
    _, heldout = exemplars("xnli", lang, cfg)
    texts.setdefault("en", [en for en, _ in heldout[:n]])
    texts[lang] = [tgt for _, tgt in heldout[:n]]
  out = {}
  for lang, sents in texts.items():
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in sents)
    out[lang] = round(tokens / max(sum(len(t) for t in sents), 1), 3)
  return out


def markdown(result: dict) -> str:
  models = result["models"]
  names = [m["model_name"] for m in models]
  lines = [f"# Self-translation quality ({', '.join(names)}; {result['dtype']}, "
           f"{result['shots']}-shot, greedy)", ""]
  first = models[0]["quality"]["langs"]
  if first:
    head = " | ".join(f"chrF {n}" for n in names) + " | " + " | ".join(
        f"BLEU {n}" for n in names) + " | " + " | ".join(f"passes filters {n}" for n in names)
    lines += [f"| lang | set | n | {head} |", "|---|---|---:|" + "---:|" * (3 * len(names))]
  for lang, sets in first.items():
    for name in sets:
      rows = [m["quality"]["langs"][lang][name] for m in models]
      cells = ([f"{r['chrf']:.1f}" for r in rows]
               + [f"{r['bleu']:.1f} ({r['bleu_tokenize']})" for r in rows]
               + [f"{r['filter_pass_rate']:.0%}" for r in rows])
      lines.append(f"| {lang} | {name} | {rows[0]['n']} | " + " | ".join(cells) + " |")
  if all("tokens_per_char" in m for m in models):
    langs = list(models[0]["tokens_per_char"])
    lines += ["", "Tokens per character (held-out XNLI dev: English sources and the human "
              "translations; no special tokens):", "",
              "| tokenizer | vocab | " + " | ".join(langs) + " |",
              "|---|---:|" + "---:|" * len(langs)]
    for m in models:
      lines.append(f"| {m['model_name']} | {m['vocab_size']:,} | "
                   + " | ".join(f"{m['tokens_per_char'][k]:.2f}" for k in langs) + " |")
  for m in models:
    lines += ["", f"## {m['model_name']}", ""]
    for lang, sets in m["quality"]["langs"].items():
      for name, s in sets.items():
        if s["items"]:
          lines.append(f"- {lang} {name}: `{s['items'][0]['hyp'][:80]}`")
    q = m["quality"]["throughput"]
    if q["decoded_segments"]:
      lines += ["", f"Quality runs: {q['decoded_segments']} segments, {q['decoded_tokens']} "
                f"tokens in {q['decode_s']:.0f} s ({q['segments_per_s']:.2f} segments/s, "
                f"{q['tokens_per_s']:.1f} tokens/s, compilation included); load "
                f"{m['load_s']:.0f} s."]
    g = m.get("gsm8k")
    if g:
      lines += ["", f"GSM8K train -> {g['lang']}: {g['questions']} questions, "
                f"{g['segments_decoded']} segments ({g['segments_per_question']}/question), "
                f"{g['decoded_tokens']} tokens in {g['decode_s']:.0f} s: "
                f"{g['segments_per_s']:.2f} segments/s, {g['tokens_per_s']:.1f} tokens/s, "
                f"{g['s_per_question']:.1f} s/question -> 1,000 questions ~ "
                f"{g['extrapolated_1000_questions_h']:.1f} h. Kept {g['kept']}, dropped "
                f"{g['dropped']}."]
  if result.get("note"):
    lines += ["", result["note"]]
  lines += ["", f"Machine: {result['machine']}. chrF: sacrebleu corpus chrF (char 6-grams, "
            "whitespace ignored, so character-level for th/zh). BLEU: sacrebleu, tokenize 'zh' "
            "for zh, 'char' for th, '13a' otherwise.", ""]
  return "\n".join(lines)


def run_model(path: str, langs: list[str], args) -> dict:
  """Quality, tokens per character and (optionally) GSM8K throughput of one model."""
  import gc  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from stt_jax import run_config, translate_quality  # pylint: disable=g-import-not-at-top
  from stt_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  model, config = load_hf(path, dtype=args.dtype)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  cfg = run_config.get_config()
  cfg.translate.shots, cfg.translate.batch_size = args.shots, args.batch_size
  cfg.translate.quality.mgsm_leave_one_out = not args.no_mgsm_loo
  out = {"model": path, "model_name": os.path.basename(path.rstrip("/")),
         "architecture": config.architecture, "vocab_size": config.vocab_size,
         "load_s": round(time.perf_counter() - start, 1)}
  out["tokens_per_char"] = tokens_per_char(tokenizer, langs, args.n, cfg.translate)
  out["quality"] = translate_quality.quality_report(model, tokenizer, langs, cfg.translate,
                                                    n=args.n)
  if args.gsm8k:
    out["gsm8k"] = gsm8k_throughput(model, tokenizer, cfg, args)
  out["total_s"] = round(time.perf_counter() - start, 1)
  del model
  gc.collect()
  return out


def main() -> int:
  args = parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from stt_jax import run_config  # pylint: disable=g-import-not-at-top
  paths = args.model or [run_config.demo_model_path()]
  langs = [lang for lang in args.langs.split(",") if lang]
  result = {"dtype": args.dtype, "shots": args.shots, "batch_size": args.batch_size, "n": args.n,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax "
                       f"{jax.__version__} on {jax.devices()[0].platform}",
            "models": [run_model(path, langs, args) for path in paths]}
  out = pathlib.Path(args.out)
  if args.append and out.exists():
    old = json.loads(out.read_text(encoding="utf-8"))
    same = all(old.get(k) == result[k] for k in ("dtype", "shots", "n"))
    if not same:
      raise SystemExit(f"{out}: --append needs the same --dtype/--shots/--n as the stored run")
    names = {m["model_name"] for m in result["models"]}
    result["models"] = [m for m in old["models"] if m["model_name"] not in names] + result[
        "models"]
    result["note"] = old.get("note", "")
  if args.note:
    result["note"] = " ".join(x for x in (result.get("note"), args.note) if x)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
  print(markdown(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
