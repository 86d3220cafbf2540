"""Code-switched training examples: some fields in the target language, the rest in English.

A pattern is a string such as "question=tgt,rationale=en": every named field comes from the
self-translation (tgt) or the English original (en); unnamed fields stay English. The paper
reports that mixing such examples into fine-tuning can help cross-lingual transfer further.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SIDES = ("tgt", "en")

# Defaults per task: the two directions of each field pairing. For QA the answer follows the
# context (it must be a span of it).
DEFAULT_PATTERNS = {
    "mgsm": ("question=tgt,rationale=en", "question=en,rationale=tgt"),
    "xquad": ("context=tgt,answer=tgt,question=en", "context=en,answer=en,question=tgt"),
    "xnli": ("premise=tgt,hypothesis=en", "premise=en,hypothesis=tgt"),
}


def parse_pattern(spec: str, fields: Sequence[str]) -> dict[str, str]:
  """'question=tgt,rationale=en' -> {field: 'tgt' | 'en'} over all `fields` (default en).

  Raises ValueError for unknown fields/sides and for patterns that switch nothing.
  """
  sides = dict.fromkeys(fields, "en")
  for part in filter(None, (p.strip() for p in spec.split(","))):
    field, sep, side = (s.strip() for s in part.partition("="))
    if not sep or field not in sides or side not in SIDES:
      raise ValueError(f"code-switch pattern {spec!r}: {part!r} must be <field>=tgt|en with "
                       f"field one of {', '.join(fields)}")
    sides[field] = side
  if len(set(sides.values())) < 2:
    raise ValueError(f"code-switch pattern {spec!r} puts every field in one language; name at "
                     "least one field =tgt and one =en")
  return sides


def pattern_slug(sides: Mapping[str, str], lang: str) -> str:
  """Id suffix naming which fields are in which language, e.g. 'cs-question_de-rationale_en'."""
  return "cs-" + "-".join(f"{f}_{lang if s == 'tgt' else 'en'}" for f, s in sides.items())


def target_fields(sides: Mapping[str, str]) -> list[str]:
  return [f for f, s in sides.items() if s == "tgt"]
