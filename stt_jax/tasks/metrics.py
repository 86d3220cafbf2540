"""Answer extraction and metrics shared by the tasks.

Everything here is pure Python over strings, so it is testable without a
model and identical for training-time checks and evaluation.
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from typing import Callable, Optional, Sequence, Union

Number = Union[int, float]

# ---------------------------------------------------------------------------
# Numbers (MGSM).

# Spaces used as thousands separators: regular, no-break, narrow no-break,
# thin and figure space.
_SPACES = " \u00a0\u202f\u2009\u2007"
# Thousands separators, the same in every language: a model asked in German
# may still write "1,200", one asked in Russian "1,000" or "1.000". Apostrophes
# are Swiss style (1'000, 1’000); the full-width comma "，" only ever groups,
# since in Chinese text "48，24" is more often a list than a decimal.
_GROUP = ",.'\u2019\uff0c" + _SPACES
_DECIMAL = ",."

# Full-width and typographic variants folded to ASCII before parsing (the
# full-width comma is kept: see _GROUP).
_FOLD = str.maketrans({"\uff0e": ".", "\uff0d": "-", "\u2212": "-",
                       "\uff1a": ":"})

# One number, after _fold. The rule, in every language:
#   a separator of _GROUP followed by exactly three digits and then a
#   non-digit is a thousands separator, if the number starts with 1-3 digits
#   that are not a lone 0 and every group uses the same separator:
#   1,000 1.000 1 000 1\u202f000 1’000 -> 1000, 12.500.000 -> 12500000;
#   else "," or "." followed by digits is the decimal mark: 1,5 1.5 0,25
#   0.500 1.2345 -> decimals, 1,000.5 and 1.000,5 -> 1000.5.
# So "1.000" is 1000, never the decimal 1.0, and "33.333" is 33333: every
# MGSM gold is an integer (23 of 250 are >= 1000), while GSM8K writes such a
# three-digit decimal 7 times in 8.8k questions and rationales, never as a
# final answer. Source and translation are read alike, so the translate
# numbers filter is not thrown off by them either.
_NUMBER_RE = re.compile(
    rf"(?:(?<![\w-])(?P<sign>-))?(?<!\d)"
    rf"(?P<int>(?!0)\d{{1,3}}(?P<sep>[{re.escape(_GROUP)}])\d{{3}}"
    rf"(?:(?P=sep)\d{{3}})*(?!\d)|\d+)"
    rf"(?:[{_DECIMAL}](?P<frac>\d+))?")

# Phrases that introduce the final answer, as written in the MGSM exemplars
# (data/mgsm/exemplars_*.jsonl): en "The answer is 11.", de "Die Antwort
# lautet 29." (once "Die Antwort ist 11."), ru "Ответ — 11.", th "คำตอบคือ 11",
# zh "答案是 11。". English is always tried as well, since a model tested in
# another language may still answer in English.
ANSWER_PHRASES = {
    "en": r"the answer is",
    "de": r"die antwort (?:lautet|ist)",
    "ru": r"ответ\b(?:\s*(?:будет|равен|равно|составляет))?",
    "th": r"คำตอบคือ|คำตอบ\s*:",
    "zh": r"答案(?:是|为|:)",
}
# Between the phrase and its number only spaces, punctuation and currency
# signs may appear ("The answer is $18", "Ответ — 11", "答案是：11").
_GAP = r"[^\w\n]{0,12}?"


def _answer_regex(lang: str) -> str:
  phrases = sorted({ANSWER_PHRASES["en"], ANSWER_PHRASES.get(lang, "")} - {""})
  return "(?:" + "|".join(phrases) + ")" + _GAP + _NUMBER_RE.pattern


_ANSWER_RE = {lang: re.compile(_answer_regex(lang), re.IGNORECASE)
              for lang in ANSWER_PHRASES}


def _fold(text: str) -> str:
  """Typographic variants to ASCII and every Unicode decimal digit (full-width
  ０-９, Thai ๐-๙, ...) to 0-9, so the number regex sees one alphabet."""
  text = str(text).translate(_FOLD)
  if text.isascii():
    return text
  return re.sub(r"\d", lambda m: str(unicodedata.decimal(m[0])), text)


def _as_number(match: re.Match) -> Number:
  digits = "".join(ch for ch in match["int"] if ch.isdigit())
  text = (match["sign"] or "") + digits
  if match["frac"] and int(match["frac"]) != 0:
    return float(f"{text}.{match['frac']}")
  return int(text)


def parse_number(text: str) -> Optional[Number]:
  """Parses a whole string as one number ('2,125' -> 2125), else None."""
  match = _NUMBER_RE.fullmatch(_fold(text).strip())
  return _as_number(match) if match else None


def find_numbers(text: str) -> list[Number]:
  """All numbers in `text`, in order (the rule above, in every language)."""
  return [_as_number(m) for m in _NUMBER_RE.finditer(_fold(text))]


def extract_number(text: str, lang: str = "en") -> Optional[Number]:
  """The final answer of a chain of thought.

  The first "The answer is N" (in `lang` or English) wins; without one, the
  last number in the text. None when the text has no number.
  """
  text = _fold(text)
  answer = _ANSWER_RE.get(lang, _ANSWER_RE["en"]).search(text)
  if answer:
    return _as_number(answer)
  numbers = find_numbers(text)
  return numbers[-1] if numbers else None


def numbers_equal(a: Optional[Number], b: Optional[Number]) -> bool:
  """Numeric equality (18 == 18.0), tolerant to float round-off."""
  if a is None or b is None:
    return False
  return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def format_number(value: Number) -> str:
  """Canonical text for a gold number: no separators, no trailing '.0'."""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return str(value)


# ---------------------------------------------------------------------------
# Spans (XQuAD): SQuAD v1.1 exact match and token F1.

# Languages without whitespace word boundaries: F1 over characters.
CHAR_TOKEN_LANGS = frozenset({"zh", "th", "ja"})


def is_punct(ch: str) -> bool:
  # SQuAD v1.1 strips string.punctuation; the MLQA script extends that to all
  # Unicode punctuation (category P*), which matters for "。", "«", "—"...
  return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str, lang: str = "en") -> str:
  """SQuAD v1.1 normalisation: lower, drop punctuation and English articles,
  collapse whitespace."""
  text = "".join(ch for ch in text.lower() if not is_punct(ch))
  if lang == "en":
    text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def answer_tokens(text: str, lang: str = "en") -> list[str]:
  """Tokens for F1: characters for zh/th, whitespace words otherwise."""
  normalized = normalize_answer(text, lang)
  if lang in CHAR_TOKEN_LANGS:
    return [ch for ch in normalized if not ch.isspace()]
  return normalized.split()


def exact_match(prediction: str, gold: str, lang: str = "en") -> float:
  return float(normalize_answer(prediction, lang) ==
               normalize_answer(gold, lang))


def token_f1(prediction: str, gold: str, lang: str = "en") -> float:
  """Harmonic mean of token precision and recall (bag of tokens)."""
  pred, ref = answer_tokens(prediction, lang), answer_tokens(gold, lang)
  if not pred or not ref:  # SQuAD v2 rule, so an empty gold can still match.
    return float(pred == ref)
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def max_over_golds(metric: Callable[[str, str, str], float], prediction: str,
                   golds: Sequence[str], lang: str) -> float:
  return max(metric(prediction, gold, lang) for gold in golds)


def first_line(text: str) -> str:
  """The first non-empty line, stripped: a span answer ends at a newline."""
  for line in text.splitlines():
    if line.strip():
      return line.strip()
  return ""


# ---------------------------------------------------------------------------
# Labels (XNLI).

LABELS = ("entailment", "neutral", "contradiction")

# Stems of each label word; a model fine-tuned on translated data may answer
# with the label in the target language. English is always accepted.
LABEL_STEMS = {
    "en": {"entailment": ("entail",), "neutral": ("neutral",),
           "contradiction": ("contradict",)},
    "de": {"entailment": ("folgerung", "implikation"),
           "neutral": ("neutral",),
           "contradiction": ("widerspr",)},
    "ru": {"entailment": ("следован", "следств"),
           "neutral": ("нейтрал",),
           "contradiction": ("противореч",)},
    "th": {"entailment": ("การอนุมาน", "คล้อยตาม", "สอดคล้อง"),
           "neutral": ("เป็นกลาง",),
           "contradiction": ("ขัดแย้ง",)},
    "zh": {"entailment": ("蕴含", "蕴涵"),
           "neutral": ("中立", "中性"),
           "contradiction": ("矛盾",)},
}


def _label_words(lang: str) -> dict[str, str]:
  """Lower-case stem -> label, for English and `lang`."""
  words = {}
  for table in (LABEL_STEMS["en"], LABEL_STEMS.get(lang, {})):
    words.update({w: label for label, stems in table.items() for w in stems})
  return words


_LABEL_WORDS = {lang: _label_words(lang) for lang in LABEL_STEMS}
_LABEL_RE = {
    lang: re.compile("|".join(map(re.escape, sorted(words, key=len,
                                                    reverse=True))),
                     re.IGNORECASE)
    for lang, words in _LABEL_WORDS.items()}


def match_label(text: str, lang: str = "en") -> Optional[str]:
  """The label whose word appears first in `text` (English or `lang`)."""
  lang = lang if lang in LABEL_STEMS else "en"
  match = _LABEL_RE[lang].search(text)
  return _LABEL_WORDS[lang][match.group(0).lower()] if match else None


ScoreFn = Callable[[list[str], list[str]], Sequence[float]]


def rank_choices(prompts: Sequence[str], choices: Sequence[str],
                 score_fn: ScoreFn) -> list[int]:
  """Index of the highest-scoring continuation for each prompt.

  `score_fn(prompts, continuations)` returns one score (e.g. summed log-
  likelihood) per pair; all prompts x choices go in one call so the caller
  can batch them. Ties go to the earlier choice.
  """
  return rank_each([(p, choices) for p in prompts], score_fn)


def rank_each(requests: Sequence[tuple[str, Sequence[str]]],
              score_fn: ScoreFn) -> list[int]:
  """rank_choices where each prompt has its own continuations (XNLI's
  lm-eval form puts the hypothesis in every choice)."""
  flat_prompts = [p for p, conts in requests for _ in conts]
  flat_conts = [c for _, conts in requests for c in conts]
  scores = list(score_fn(flat_prompts, flat_conts))
  if len(scores) != len(flat_prompts):
    raise ValueError(f"score_fn returned {len(scores)} scores for "
                     f"{len(flat_prompts)} prompt/continuation pairs")
  best, start = [], 0
  for _, conts in requests:
    mine = scores[start:start + len(conts)]
    best.append(max(range(len(mine)), key=lambda j: (mine[j], -j)))
    start += len(conts)
  return best


def mean(values: Sequence[float]) -> float:
  return sum(values) / len(values) if values else 0.0
