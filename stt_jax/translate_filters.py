"""Checks on self-translated text: degenerate outputs, sentence splitting, answer re-alignment.

A 0.5B-7B model translating few-shot fails in a handful of recognisable ways: it stops at
once (empty), echoes the English (copy), loops ("the man the man the man ..."), runs out of
its token budget, writes the wrong script (Latin instead of Thai) or a text far too short or
long. Each check returns the name of the reason so the stage can count drops by reason.

Two checks judge the translation rather than what it rightly keeps from the source: the script
ratio leaves out names and units copied from the source ('Natalia在四月份卖了48个发夹。' is all
Chinese, '他吃了 48 块 because 32 + 16 = 48' is not), and for math every number of the source
must still be in the translation.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import unicodedata
from collections.abc import Mapping, Sequence

from stt_jax.tasks import metrics

# Letters of a target language's script. A translation into th/zh/ru must be mostly these.
SCRIPTS = {
    "th": ((0x0E00, 0x0E7F),),
    "zh": ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF)),
    "ru": ((0x0400, 0x04FF), (0x0500, 0x052F)),
}
# Languages written without spaces between words (char-level spans and n-grams).
UNSPACED = frozenset({"th", "zh", "ja"})
# Order in which a segment's checks run; the first failing one is its drop reason.
REASONS = ("empty", "truncated", "repetition", "copy", "script", "length_ratio", "numbers")

# A unit of 1-40 characters repeated at least 4 times in a row: a greedy-decoding loop.
_LOOP = re.compile(r"(.{1,40}?)\1{3,}", re.S)


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """Bounds of the checks (see translate.default_translate_config for what each means)."""
  enabled: tuple[str, ...] = REASONS
  min_chars: int = 20
  repeat_min_count: int = 4
  repeat_min_chars: int = 16
  script_min_fraction: float = 0.5
  length_ratio: Mapping[str, tuple[float, float]] = dataclasses.field(
      default_factory=lambda: {"default": (0.3, 3.0)})
  script_ignore_copied: bool = True
  numbers: bool = False  # on for math tasks (translate.filter_config)

  def ratio_bounds(self, lang: str) -> tuple[float, float]:
    return tuple(self.length_ratio.get(lang, self.length_ratio["default"]))


def letters(text: str) -> list[str]:
  return [c for c in text if unicodedata.category(c).startswith("L")]


def has_letters(text: str) -> bool:
  return any(unicodedata.category(c).startswith("L") for c in text)


# A run of letters (no digits, no underscore).
_WORD = re.compile(r"[^\W\d_]+")


def _in_script(c: str, ranges) -> bool:
  return any(lo <= ord(c) <= hi for lo, hi in ranges)


# Common English words that start sentences ('If', 'How', 'She'): capitalised there, but no name.
_COMMON = frozenset("""
a an the and or but so if then when while where what which who whom whose why how i he she it we
they you me him her us them his its our their your my this that these those there here in on at
by for from to of with into after before since because as also each every all some any no not
one two next first finally now today yesterday tomorrow once is are was were be do does did
can could will would should may might must has have had let""".split())
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]['\"’”)\]]*)\s*['\"“‘(\[]*$")


def kept_words(source: str) -> set[str]:
  """Case-folded words of an English `source` that a translation may keep as they are: names and
  acronyms (capitalised, other than a common word opening a sentence: 'Natalia', 'May', 'YMCA',
  'S') and unit-like words without a vowel ('km', 'mph', 'x'). Other copied words ('earns',
  'because') are untranslated English."""
  kept = set()
  for m in _WORD.finditer(source):
    word = m.group(0)
    opens = _SENTENCE_START.search(source[max(0, m.start() - 8):m.start()]) is not None
    if (word[0].isupper() and not (opens and word.casefold() in _COMMON)) or \
        not re.search(r"[aeiouy]", word, re.IGNORECASE):
      kept.add(word.casefold())
  return kept


def _copied_letters(text: str, source: str, ranges) -> int:
  """Letters of `text` outside the target script in names and units kept from `source` (see
  kept_words; matched case-insensitively): 'Natalia' or 'km' in a Chinese or Thai sentence."""
  known, copied = kept_words(source), 0
  for m in _WORD.finditer(text):  # '王恩Natalia' -> '王恩', 'Natalia'
    for target, group in itertools.groupby(m.group(0), lambda c: _in_script(c, ranges)):
      piece = "".join(group)
      if not target and piece.casefold() in known:
        copied += len(piece)
  return copied


def script_fraction(text: str, lang: str, source: str | None = None) -> float | None:
  """Share of `text`'s letters in `lang`'s script; None if `lang` has no script check or the
  text has no letters (numbers and formulas are fine in any language).

  With `source`, names and units kept from it are left out (see _copied_letters); a text made
  only of those scores 0.0: nothing in it was translated.
  """
  ranges = SCRIPTS.get(lang)
  found = letters(text)
  if ranges is None or not found:
    return None
  inside = sum(_in_script(c, ranges) for c in found)
  total = len(found)
  if source is not None:
    total -= _copied_letters(text, source, ranges)
  return inside / total if total else 0.0


# Ordinals ('1st', '2nd', '3rd', '4th'): often written in words ('第二天').
_ORDINAL = re.compile(r"(?<!\d)\d+(?:st|nd|rd|th)\b", re.IGNORECASE)


def missing_numbers(source: str, output: str) -> list[metrics.Number]:
  """Numbers of `source` that `output` lacks, both read with metrics.find_numbers (thousands
  separators, decimal commas, full-width and Thai digits); ordinals are not required."""
  have = metrics.find_numbers(output)
  need = dict.fromkeys(metrics.find_numbers(_ORDINAL.sub(" ", source)))
  return [n for n in need if not any(metrics.numbers_equal(n, h) for h in have)]


def loop_span(text: str, min_count: int = 4, min_chars: int = 16) -> str | None:
  """The first run of a unit (with a letter) repeated >= min_count times, >= min_chars long."""
  for m in _LOOP.finditer(text):
    unit, run = m.group(1), m.group(0)
    if len(run) // len(unit) >= min_count and len(run) >= min_chars and has_letters(unit):
      return run
  return None


def _normal(text: str) -> str:
  """Case-folded letters and digits only, for the copy check."""
  return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if c.isalnum())


def check(source: str, output: str, lang: str, cfg: FilterConfig, truncated: bool = False,
          light: bool = False) -> str | None:
  """The first failed check's reason (see REASONS), or None when the translation is usable.

  Sources shorter than cfg.min_chars (names, numbers, short answers) and `light` ones skip the
  copy, script and length checks: 'Denver Broncos' legitimately stays 'Denver Broncos' in
  German or Chinese. The numbers check (cfg.numbers) runs on every non-light source: 'The
  answer is 72.' is short and its number is the whole point.
  """
  on = set(cfg.enabled)
  long_enough = len(source.strip()) >= cfg.min_chars and not light
  if "empty" in on and not output.strip():
    return "empty"
  if "truncated" in on and truncated:
    return "truncated"
  if "repetition" in on and loop_span(output, cfg.repeat_min_count, cfg.repeat_min_chars) \
      and not loop_span(source, cfg.repeat_min_count, cfg.repeat_min_chars):
    return "repetition"
  numbers = "numbers" in on and cfg.numbers and not light
  if not long_enough:
    return "numbers" if numbers and missing_numbers(source, output) else None
  if "copy" in on and _normal(output) == _normal(source) and has_letters(source):
    return "copy"
  fraction = script_fraction(output, lang, source if cfg.script_ignore_copied else None)
  if "script" in on and fraction is not None and fraction < cfg.script_min_fraction:
    return "script"
  lo, hi = cfg.ratio_bounds(lang)
  if "length_ratio" in on and not lo <= len(output.strip()) / len(source.strip()) <= hi:
    return "length_ratio"
  return "numbers" if numbers and missing_numbers(source, output) else None


# ------------------------------------------------------------------------------ sentences

# Regex splitter for English sources: a sentence ends at . ! or ? (plus closing quotes or
# brackets) followed by whitespace and an upper-case letter, digit or opening quote, unless
# the word before the dot is a known abbreviation or a single initial ("J. S. Bach").
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e u.s u.k no vol fig jan feb mar apr jun jul aug "
    "sep sept oct nov dec gen col lt sgt capt rev mt ft approx ca c inc ltd co corp".split())
_SENTENCE_END = re.compile(r"""[.!?]["')\]]*(\s+)(?=["'(\[]?[A-Z0-9\u00C0-\u024F])""")


def _after_abbreviation(sentence: str) -> bool:
  """Whether `sentence` ends with an abbreviation's dot rather than a full stop."""
  sentence = sentence.rstrip("\"')]")
  if not sentence.endswith("."):
    return False
  word = sentence.rsplit(None, 1)[-1].rstrip(".").lower()
  return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def regex_sentences(text: str) -> list[str]:
  """Splits `text` into sentences with the documented regex (see _SENTENCE_END)."""
  pieces, start = [], 0
  for m in _SENTENCE_END.finditer(text):
    if _after_abbreviation(text[start:m.start(1)]):
      continue
    pieces.append(text[start:m.start(1)].strip())
    start = m.end(1)
  pieces.append(text[start:].strip())
  return [p for p in pieces if p]


def split_sentences(text: str, splitter: str = "auto") -> list[str]:
  """Sentences of an English text: pysbd when installed ('auto'/'pysbd'), else the regex."""
  if splitter in ("auto", "pysbd"):
    try:
      import pysbd  # pylint: disable=g-import-not-at-top  # optional
    except ImportError:
      if splitter == "pysbd":
        raise
    else:
      return [s.strip() for s in pysbd.Segmenter(language="en", clean=False).segment(text)
              if s.strip()]
  elif splitter != "regex":
    raise ValueError(f"sentence_splitter={splitter!r}; use 'auto', 'pysbd' or 'regex'")
  return regex_sentences(text)


# ------------------------------------------------------------------------------ SQuAD answers


@dataclasses.dataclass(frozen=True)
class Span:
  start: int
  end: int
  method: str  # exact | normalised | fuzzy


def _normalised_with_map(text: str) -> tuple[str, list[int]]:
  """NFKC + casefold, punctuation as space, whitespace runs as one space; with, for each
  output character, the index of the input character it came from."""
  out, where = [], []
  for i, c in enumerate(text):
    if unicodedata.category(c).startswith("P"):
      c = " "
    for n in unicodedata.normalize("NFKC", c).casefold():
      if n.isspace():
        if not out or out[-1] == " ":
          continue
        n = " "
      out.append(n)
      where.append(i)
  return "".join(out), where


def _closest(starts: Sequence[int], expect: float | None) -> int:
  return starts[0] if expect is None else min(starts, key=lambda s: abs(s - expect))


def _occurrences(needle: str, hay: str) -> list[int]:
  found, i = [], hay.find(needle)
  while needle and i >= 0:
    found.append(i)
    i = hay.find(needle, i + 1)
  return found


def _trim(context: str, start: int, end: int, lang: str) -> tuple[int, int]:
  """Widens a fuzzy span to whole words (spaced languages) and trims spaces/punctuation."""
  if lang not in UNSPACED:
    while start > 0 and context[start - 1].isalnum():
      start -= 1
    while end < len(context) and context[end].isalnum():
      end += 1
  edge = lambda c: c.isspace() or unicodedata.category(c).startswith("P")
  while start < end and edge(context[start]):
    start += 1
  while end > start and edge(context[end - 1]):
    end -= 1
  return start, end


def locate_answer(answer: str, context: str, lang: str, expect: float | None = None,
                  fuzzy_min_score: float = 80.0) -> Span | None:
  """Where a translated answer is in the translated context: exact, then normalised (case,
  punctuation, whitespace, NFKC), then fuzzy (rapidfuzz partial_ratio alignment, score >=
  fuzzy_min_score); None when none works. Several hits: the one nearest `expect` (the English
  answer's relative position mapped onto this context)."""
  answer = answer.strip()
  if not answer or not context:
    return None
  starts = _occurrences(answer, context)
  if starts:
    s = _closest(starts, expect)
    return Span(s, s + len(answer), "exact")
  norm_ctx, where = _normalised_with_map(context)
  norm_ans = _normalised_with_map(answer)[0].strip()
  if not norm_ans:
    return None
  starts = _occurrences(norm_ans, norm_ctx)
  if starts:
    s = _closest(starts, None if expect is None else _to_norm(where, expect))
    return Span(where[s], where[s + len(norm_ans) - 1] + 1, "normalised")
  from rapidfuzz import fuzz  # pylint: disable=g-import-not-at-top
  hit = fuzz.partial_ratio_alignment(norm_ans, norm_ctx, score_cutoff=fuzzy_min_score)
  if hit is None or hit.dest_end <= hit.dest_start:
    return None
  start, end = _trim(context, where[hit.dest_start], where[hit.dest_end - 1] + 1, lang)
  return Span(start, end, "fuzzy") if end > start else None


def _to_norm(where: list[int], position: float) -> float:
  """An original-text position as a normalised-text position."""
  return next((k for k, i in enumerate(where) if i >= position), len(where))
