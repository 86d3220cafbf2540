"""Self-translation quality and throughput of a real model (default: the demo 0.5B Qwen).

1. quality_report: chrF/BLEU against human translations, per language, on held-out XNLI dev
   sentences (8-shot XNLI prompt) and on the MGSM exemplar questions (leave-one-out).
2. translate_task on the first GSM8K train questions (question + rationale, line by line):
   measured throughput, extrapolated to 1,000 questions.

  python benchmarks/translate_quality.py [--model DIR] [--langs de,ru,th,zh] [--n 100]
      [--gsm8k 25] [--gsm8k-lang zh] [--batch-size 8] [--dtype float32]

Writes benchmarks/results/translate_quality.json and .md (a markdown table).
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
  p.add_argument("--model", default=os.path.expanduser(
      "~/.cache/stt_jax/qwen2.5-coder-0.5b-instruct"))
  p.add_argument("--langs", default="de,ru,th,zh")
  p.add_argument("--n", type=int, default=100, help="held-out XNLI sentences per language")
  p.add_argument("--no-mgsm-loo", action="store_true", help="skip MGSM leave-one-out")
  p.add_argument("--gsm8k", type=int, default=25, help="GSM8K questions to time (0 = skip)")
  p.add_argument("--gsm8k-lang", default="zh")
  p.add_argument("--shots", type=int, default=8)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--dtype", default="float32")
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


def markdown(result: dict) -> str:
  lines = [f"# Self-translation quality ({result['model_name']}, {result['dtype']}, "
           f"{result['shots']}-shot, greedy)", ""]
  if result["quality"]["langs"]:
    lines += ["| lang | set | n | chrF | BLEU (tokenize) | passes filters | example |",
              "|---|---|---:|---:|---:|---:|---|"]
  for lang, sets in result["quality"]["langs"].items():
    for name, s in sets.items():
      example = s["items"][0]["hyp"].replace("|", "/")[:60] if s["items"] else ""
      lines.append(f"| {lang} | {name} | {s['n']} | {s['chrf']:.1f} | {s['bleu']:.1f} "
                   f"({s['bleu_tokenize']}) | {s['filter_pass_rate']:.0%} | {example} |")
  q = result["quality"]["throughput"]
  lines += [] if not q["decoded_segments"] else ["", f"Quality runs: {q['decoded_segments']} segments, {q['decoded_tokens']} tokens in "
            f"{q['decode_s']:.0f} s ({q['segments_per_s']:.2f} segments/s, "
            f"{q['tokens_per_s']:.1f} tokens/s, compilation included)."]
  if result.get("note"):
    lines += ["", result["note"]]
  g = result.get("gsm8k")
  if g:
    lines += ["", f"GSM8K train -> {g['lang']}: {g['questions']} questions, "
              f"{g['segments_decoded']} segments ({g['segments_per_question']}/question), "
              f"{g['decoded_tokens']} tokens in {g['decode_s']:.0f} s: "
              f"{g['segments_per_s']:.2f} segments/s, {g['tokens_per_s']:.1f} tokens/s, "
              f"{g['s_per_question']:.1f} s/question -> 1,000 questions ~ "
              f"{g['extrapolated_1000_questions_h']:.1f} h. Kept {g['kept']}, dropped "
              f"{g['dropped']}."]
  lines += ["", f"Machine: {result['machine']}. chrF: sacrebleu corpus chrF (char 6-grams, "
            "whitespace ignored, so character-level for th/zh). BLEU: sacrebleu, tokenize 'zh' "
            "for zh, 'char' for th, '13a' otherwise.", ""]
  return "\n".join(lines)


def main() -> int:
  args = parse_args()
  import transformers  # pylint: disable=g-import-not-at-top
  from stt_jax import run_config, translate_quality  # pylint: disable=g-import-not-at-top
  from stt_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  model, _ = load_hf(args.model, dtype=args.dtype)
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
  cfg = run_config.get_config()
  cfg.translate.shots, cfg.translate.batch_size = args.shots, args.batch_size
  cfg.translate.quality.mgsm_leave_one_out = not args.no_mgsm_loo
  result = {"model": args.model, "model_name": os.path.basename(args.model.rstrip("/")),
            "dtype": args.dtype, "shots": args.shots, "batch_size": args.batch_size,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax "
                       f"{jax.__version__} on {jax.devices()[0].platform}",
            "load_s": round(time.perf_counter() - start, 1)}
  langs = [lang for lang in args.langs.split(",") if lang]
  result["quality"] = translate_quality.quality_report(model, tokenizer, langs, cfg.translate,
                                                       n=args.n)
  if args.gsm8k:
    result["gsm8k"] = gsm8k_throughput(model, tokenizer, cfg, args)
  result["total_s"] = round(time.perf_counter() - start, 1)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
  out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
  print(markdown(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
