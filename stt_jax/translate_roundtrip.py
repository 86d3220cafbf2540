"""The round-trip filter: translate each kept translation back to English with the same model
and keep a row only when the back-translation still says what the English source said.

  back = back_pairs(pairs)                                   # target -> English exemplars
  todo = back_sources(plans, fields, found)                  # forward outputs to decode
  texts = back_texts(plan, fields, found, back_found, cfg)   # field -> back-translation
  scores = field_chrf(english_texts, texts)                  # field -> chrF
  keep = keep_mask([min(s.values()) for s in all_scores], cfg.roundtrip)

Why: the forward filters (translate_filters) catch broken output (empty, loops, wrong
script), not a fluent sentence that means something else. A translation the model cannot map
back onto its source is likely such a one. The score is sentence chrF (sacrebleu, character
6-grams) of the back-translation against the English source, per field; a row's score is its
lowest field's. Not in the paper: it is the `self_translate_rt` variant. The back pass decodes
segment by segment like the forward one (stt_jax.translate), so its cost is one more decode
pass over the kept rows' segments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from stt_jax.translate import Pair, Parts, join_field, needs_decoding

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def back_pairs(pairs: Sequence[Pair]) -> list[Pair]:
  """The forward exemplars with their sides swapped: (target, English)."""
  return [(tgt, en) for en, tgt in pairs]


def forward_parts(parts: Parts, found: Mapping[str, dict]) -> Parts:
  """A field's segments as translated (segments without letters were copied, not decoded)."""
  return [[found[s]["out"] if s in found else s for s in line] for line in parts]


def back_sources(plans: Sequence[Mapping[str, Parts]], fields: Sequence[str],
                 found: Mapping[str, dict]) -> list[str]:
  """The unique forward outputs of `fields` of the planned rows that need decoding, in order."""
  out = {}
  for plan in plans:
    for field in fields:
      for line in forward_parts(plan[field], found):
        out.update((s, None) for s in line if needs_decoding(s))
  return list(out)


def back_texts(plan: Mapping[str, Parts], fields: Sequence[str], found: Mapping[str, dict],
               back: Mapping[str, dict], cfg) -> dict[str, str]:
  """field -> the back-translation of its translation, joined like an English text."""
  texts = {}
  for field in fields:
    parts = [[back[s]["out"] if s in back else s for s in line]
             for line in forward_parts(plan[field], found)]
    texts[field] = join_field(parts, cfg.src_lang, cfg)
  return texts


def field_chrf(sources: Mapping[str, str], backs: Mapping[str, str]) -> dict[str, float]:
  """field -> sentence chrF (0-100) of the back-translation against the English source."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  return {f: round(sacrebleu.sentence_chrf(backs[f], [sources[f]]).score, 2) for f in backs}


def keep_mask(scores: Sequence[float], rule) -> list[bool]:
  """Which rows pass: each row's score (its lowest field chrF) >= rule.min_chrf, or, with
  rule.keep_fraction, the ceil(fraction x rows) best scores (ties: the earlier row)."""
  if rule.min_chrf > 0:
    return [s >= rule.min_chrf for s in scores]
  n = math.ceil(rule.keep_fraction * len(scores) - 1e-9)
  best = sorted(range(len(scores)), key=lambda i: -scores[i])[:n]  # A stable sort.
  keep = [False] * len(scores)
  for i in best:
    keep[i] = True
  return keep


def rule_of(rule) -> dict[str, float]:
  """The active keep rule, as the stats show it."""
  return ({"min_chrf": rule.min_chrf} if rule.min_chrf > 0
          else {"keep_fraction": rule.keep_fraction})


def quantiles(values: Sequence[float]) -> dict[str, float]:
  """{'p10': ..., 'p50': ..., 'p90': ..., 'mean': ...} ({} for no values)."""
  if not len(values):
    return {}
  qs = np.quantile(np.asarray(values, np.float64), QUANTILES)
  return {**{f"p{round(q * 100)}": round(float(v), 2) for q, v in zip(QUANTILES, qs)},
          "mean": round(float(np.mean(values)), 2)}


def summary(scores: Sequence[Mapping[str, float]], keep: Sequence[bool], fields, rule
            ) -> dict:
  """The round-trip counts of the stats file: checked, kept, dropped, chrF quantiles of the
  row score (lowest field) and of each field."""
  lows = [min(s.values()) for s in scores]
  return {"fields": list(fields), "rule": rule_of(rule), "checked": len(scores),
          "kept": sum(keep), "dropped": len(scores) - sum(keep),
          "chrf": {"row_min": quantiles(lows),
                   **{f: quantiles([s[f] for s in scores]) for f in fields}}}
