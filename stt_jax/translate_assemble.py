"""Training rows from segment translations: rebuild each row in the task's schema, drop rows
whose segments fail a filter (counted by reason), re-align SQuAD answers in the translated
context, and build the code-switched rows.

  result = assemble(task, english_rows, plan, found, "de", cfg.translate)
  result.rows, result.cs_rows, result.stats

`plan` is each row's fields cut into segments (translate.split_field); `found` maps each
decoded segment to its cache record ({src, out, stopped, ...}).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

from stt_jax import codeswitch
from stt_jax import translate_filters as tf
from stt_jax.translate import filter_config, is_truncated, join_field


@dataclasses.dataclass
class Assembled:
  rows: list[dict]
  cs_rows: list[dict]
  stats: dict[str, Any]
  segment_rejects: dict[str, int]
  reject_samples: dict[str, list[dict]]  # a few {src, out} per reason, to tune the filters


def _field_results(parts_by_field, found, lang, cfg, fcfg, rejects) -> tuple[dict, dict]:
  """Translated text and first drop reason (or None) of each field of one row."""
  texts, reasons = {}, {}
  for field, parts in parts_by_field.items():
    out_parts, reason = [], None
    for line in parts:
      outs = []
      for seg in line:
        record = found.get(seg)
        out = record["out"] if record else seg
        why = tf.check(seg, out, lang, fcfg, is_truncated(record),
                       light=field in cfg.filters.light_fields) if record else None
        rejects[seg] = (why, out)
        reason = reason or why
        outs.append(out)
      out_parts.append(outs)
    texts[field], reasons[field] = join_field(out_parts, lang, cfg), reason
  return texts, reasons


def _align_answers(en_row: dict, row: dict, lang: str, cfg) -> str | None:
  """Points the (translated) answer at a span of the (translated) context; the method used,
  or None when it cannot be found (the row is then dropped)."""
  answer, context = row["answers"][0]["text"], row["context"]
  en_start = en_row["answers"][0].get("answer_start", -1)
  expect = en_start / max(len(en_row["context"]), 1) * len(context) if en_start >= 0 else None
  span = tf.locate_answer(answer, context, row["lang"] if context != en_row["context"] else "en",
                          expect, cfg.filters.fuzzy_min_score)
  if span is None:
    return None
  row["answers"] = [{"text": context[span.start:span.end], "answer_start": span.start}]
  return span.method


def finalize(task, en_row: dict, texts: Mapping[str, str], lang: str, cfg,
             row_id: str) -> tuple[dict | None, str | None]:
  """(the row in the task's schema with `texts` in `lang`, or None; alignment method)."""
  row = task.with_translations(en_row, texts, lang)
  row["id"] = row_id
  method = None
  if "answers" in row and {"context", "answer"} & set(texts):
    method = _align_answers(en_row, row, lang, cfg)
    if method is None:
      return None, None
  return row, method


def _codeswitched(task, en_row, texts, reasons, lang, cfg, counts) -> list[dict]:
  rows = []
  fields = [f.name for f in task.translatable_fields]
  for spec in cfg.codeswitch.patterns.get(task.name, ()):
    sides = codeswitch.parse_pattern(spec, fields)
    tgt = codeswitch.target_fields(sides)
    slug = codeswitch.pattern_slug(sides, lang)
    if any(reasons[f] for f in tgt):
      counts[f"{slug}:dropped_filter"] += 1
      continue
    row, _ = finalize(task, en_row, {f: texts[f] for f in tgt}, lang, cfg,
                      f"{en_row['id']}.{lang}.{slug}")
    counts[f"{slug}:{'kept' if row else 'dropped_unaligned'}"] += 1
    rows += [row] if row else []
  return rows


def assemble(task, rows, plan, found, lang, cfg) -> Assembled:
  """Rebuilds translated and code-switched rows from the segment translations; counts."""
  fcfg = filter_config(cfg, task.name)
  seg_reject: dict[str, tuple[str | None, str]] = {}
  kept, cs_rows = [], []
  dropped, aligned, cs_counts = (collections.Counter() for _ in range(3))
  for en_row, parts_by_field in zip(rows, plan):
    texts, reasons = _field_results(parts_by_field, found, lang, cfg, fcfg, seg_reject)
    if cfg.codeswitch.enabled:
      cs_rows += _codeswitched(task, en_row, texts, reasons, lang, cfg, cs_counts)
    reason = next((r for r in reasons.values() if r), None)
    if reason:
      dropped[reason] += 1
      continue
    row, method = finalize(task, en_row, texts, lang, cfg, f"{en_row['id']}.{lang}")
    if row is None:
      dropped["unaligned"] += 1
      continue
    if method:
      aligned[method] += 1
    kept.append(row)
  stats = {"items": len(rows), "kept": len(kept), "dropped": dict(sorted(dropped.items())),
           "codeswitched": len(cs_rows), "codeswitch": dict(sorted(cs_counts.items()))}
  if aligned or dropped["unaligned"]:
    stats["answer_alignment"] = {**dict(aligned), "failed": dropped["unaligned"]}
  return Assembled(kept, cs_rows, stats, *_reject_summary(seg_reject))


def _reject_summary(seg_reject, samples: int = 3) -> tuple[dict, dict]:
  """Rejected unique segments per reason, and the first few (source, output) of each."""
  counts, examples = collections.Counter(), collections.defaultdict(list)
  for src, (reason, out) in seg_reject.items():
    if reason:
      counts[reason] += 1
      if len(examples[reason]) < samples:
        examples[reason].append({"src": src, "out": out})
  return dict(sorted(counts.items())), dict(sorted(examples.items()))
