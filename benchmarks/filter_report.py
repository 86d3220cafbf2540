"""Kept/dropped per filter reason, old filters vs new, on the same self-translations.

The filters only judge decoded text, so each set is decoded once (the translate stage's
cache under --workdir makes reruns free, no model load) and then assembled twice:

  before: the script ratio over all letters, no numbers check (the filters up to issue 12)
  after:  the script ratio ignores words copied from the source (names, units), and for
          math every source number must be in the translation

Sets: (a) the demo's MultiNLI -> zh (configs/demo.py: 128 sampled pairs, 8 shots) and
(b) the first --gsm8k GSM8K train questions (question + rationale) -> zh, both with the demo
model (Qwen2.5-Coder-0.5B-Instruct). Run from the repository root:

    python benchmarks/filter_report.py [--workdir=/tmp/stt_filter_report] [--gsm8k=24]
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import demo
from stt_jax import run_config, translate, translate_assemble
from stt_jax import translate_filters as tf
from stt_jax.stages import translate as stage
from stt_jax.tasks import get_task
from stt_jax.workdir import Workdir

MODEL_ID = "qwen2.5-coder-0.5b-instruct"


def section(task: str, limit: int, sample_seed: int | None):
  """The demo's config, pointed at `task` and its first/sampled `limit` rows."""
  cfg = demo.get_config()
  cfg.task.name = task
  cfg.task.train_limit = limit
  cfg.task.train_sample_seed = sample_seed
  cfg.translate.model_id = MODEL_ID
  cfg.translate.progress = False
  return cfg


def old_filters(cfg):
  """`cfg` with the filters as they were before: all letters count, no numbers check."""
  old = cfg.copy_and_resolve_references()
  old.translate.filters.script_ignore_copied = False
  old.translate.filters.numbers_tasks = ()
  return old


def cached(task_name: str, lang: str, cfg, workdir: pathlib.Path):
  """(rows, plan, {segment: record}) from the cache, or None when segments are missing."""
  task, t = get_task(task_name), cfg.translate
  rows = stage.english_rows(cfg, task)
  plan = [{f: translate.split_field(x, t) for f, x in task.translatable_texts(r).items()}
          for r in rows]
  todo = list(dict.fromkeys(
      s for fields in plan for parts in fields.values() for line in parts for s in line
      if translate.needs_decoding(s)))
  pairs, _ = translate.exemplars(t.exemplars[task.name], lang, t, cfg.task.data_dir)
  ident = (MODEL_ID, translate.prompt_id(pairs, lang, t), lang)
  cache = translate.TranslationCache(Workdir(str(workdir)).translation_cache,
                                     f"{task.name}_{lang}")
  done = cache.load()
  if any((*ident, s) not in done for s in todo):
    return None
  return rows, plan, {s: done[(*ident, s)] for s in todo}


@functools.cache
def demo_model():
  """(model, tokenizer) of the demo, loaded once and only when something must be decoded."""
  import transformers  # pylint: disable=g-import-not-at-top
  from stt_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  path = run_config.demo_model_path()
  return load_hf(path, dtype="float32")[0], transformers.AutoTokenizer.from_pretrained(path)


def decode(task_name: str, lang: str, cfg, workdir: pathlib.Path) -> None:
  """Fills the cache (the slow part: ~1.2 segments/s on 2 CPU cores)."""
  stage.translate_task(*demo_model(), task_name, lang, cfg, workdir)


def segment_drops(task, plan, found, lang, cfg) -> collections.Counter:
  """Rejected segment translations per reason (each unique segment counted once)."""
  fcfg = translate.filter_config(cfg.translate, task.name)
  seen, counts = set(), collections.Counter()
  for fields in plan:
    for field, parts in fields.items():
      for seg in (s for line in parts for s in line):
        if seg in seen or seg not in found:
          continue
        seen.add(seg)
        record = found[seg]
        counts[tf.check(seg, record["out"], lang, fcfg, translate.is_truncated(record),
                        light=field in cfg.translate.filters.light_fields) or "kept"] += 1
  return counts


def report(name: str, task_name: str, lang: str, cfg, data, samples: int) -> None:
  task = get_task(task_name)
  rows, plan, found = data
  variants = {"before": old_filters(cfg), "after": cfg}
  results = {k: translate_assemble.assemble(task, rows, plan, found, lang, c.translate)
             for k, c in variants.items()}
  segs = {k: segment_drops(task, plan, found, lang, c) for k, c in variants.items()}
  reasons = ["kept", *tf.REASONS, "unaligned"]
  print(f"\n### {name}: {len(rows)} examples, {len(found)} decoded segments\n")
  print("| | examples before | examples after | segments before | segments after |")
  print("|---|---:|---:|---:|---:|")
  for reason in reasons:
    ex = [results[k].stats["kept"] if reason == "kept" else
          results[k].stats["dropped"].get(reason, 0) for k in variants]
    sg = [segs[k].get(reason, 0) for k in variants]
    if any(ex) or any(sg):
      print(f"| {reason} | {ex[0]} | {ex[1]} | {sg[0]} | {sg[1]} |")
  if samples:
    fcfg = {k: translate.filter_config(c.translate, task.name) for k, c in variants.items()}
    changed = []
    for seg, record in found.items():
      why = {k: tf.check(seg, record["out"], lang, f, translate.is_truncated(record))
             for k, f in fcfg.items()}
      if why["before"] != why["after"]:
        changed.append((why["before"], why["after"], seg, record["out"]))
    print(f"\n{len(changed)} segments judged differently; the first {samples}:")
    for before, after, seg, out in changed[:samples]:
      print(f"- {before} -> {after}\n    en: {seg}\n    {lang}: {out}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/stt_filter_report")
  parser.add_argument("--mnli", type=int, default=128, help="MultiNLI pairs (demo: 128)")
  parser.add_argument("--gsm8k", type=int, default=24, help="first N GSM8K train questions")
  parser.add_argument("--lang", default="zh")
  parser.add_argument("--samples", type=int, default=10, help="changed verdicts to print")
  parser.add_argument("--decode_only", action="store_true", help="fill the cache, no report")
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO)
  workdir = pathlib.Path(args.workdir)
  sets = [("GSM8K -> %s" % args.lang, "mgsm", section("mgsm", args.gsm8k, None)),
          ("MultiNLI -> %s (demo)" % args.lang, "xnli", section("xnli", args.mnli, 0))]
  for name, task_name, cfg in sets:
    data = cached(task_name, args.lang, cfg, workdir)
    if data is None:
      decode(task_name, args.lang, cfg, workdir)
      data = cached(task_name, args.lang, cfg, workdir)
    if not args.decode_only:
      report(name, task_name, args.lang, cfg, data, args.samples)


if __name__ == "__main__":
  main()
