"""The scoring rules of published tables, beside our own metrics.

Our metrics (metrics.py) read answers generously so a fine-tuned model is not
marked wrong for a format slip. Published numbers use stricter, fixed rules;
these functions reproduce them so our numbers can sit in the same table:

  lm-evaluation-harness mgsm_native_cot_<lang>: strict-match and
    flexible-extract filters, then exact_match ignoring case and ASCII
    punctuation (lm_eval/tasks/mgsm/native_cot/, lm_eval/filters/extraction.py,
    lm_eval/api/metrics.py).
  lm-evaluation-harness xnli_<lang>: three full sentences
    "{premise}, {question word}? {label word}, {hypothesis}" ranked by
    log-likelihood (lm_eval/tasks/xnli/utils.py).
  lm-evaluation-harness xquad_<lang>: transformers' SQuAD v1 F1/EM against the
    first gold answer (lm_eval/tasks/xquad/utils.py).
  MLQA's evaluation script (facebookresearch/MLQA mlqa_evaluation_v1.py): F1/EM
    with per-language articles and mixed segmentation for zh; extended here to
    ru (whitespace words, no articles) and th (each Thai character a token).

Checked against EleutherAI/lm-evaluation-harness 4e7e0d4 (2026-08) and
facebookresearch/MLQA 24bf470. docs/tasks.md says how each one differs from
the harness run itself.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

from stt_jax.tasks import metrics

# ---------------------------------------------------------------------------
# MGSM (lm-eval mgsm_native_cot_<lang>).

# What the harness's regex filter returns when its pattern does not match.
INVALID = "[invalid]"

# strict-match: the answer sentence of the native-language exemplars, as the
# harness writes it (case-sensitive; zh also needs the full stop "。").
MGSM_STRICT = {
    "en": re.compile(r"The answer is (\-?[0-9\.\,]+)"),
    "de": re.compile(r"Die Antwort lautet (\-?[0-9\.\,]+)"),
    "ru": re.compile(r"Ответ — (\-?[0-9\.\,]+)"),
    "th": re.compile(r"คำตอบคือ (\-?[0-9\.\,]+)"),
    "zh": re.compile(r"答案是 (\-?[0-9\.\,]+)。"),
}
# flexible-extract: the last run of two or more of "$0-9.,", or of digits.
MGSM_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")

_NO_ASCII_PUNCT = str.maketrans("", "", string.punctuation)


def regex_filter(text: str, pattern: re.Pattern, pick: int = 0) -> str:
  """The harness's regex filter: of all matches take number `pick` (-1 = the
  last), of its groups the first non-empty one, stripped; INVALID if none."""
  found = pattern.findall(text)
  if not found:
    return INVALID
  hit = found[pick]
  if isinstance(hit, tuple):
    hit = next((group for group in hit if group), INVALID)
  return hit.strip()


def loose_exact_match(prediction: str, gold: str) -> float:
  """exact_match with ignore_case and ignore_punctuation: only ASCII
  punctuation goes, so "-5" equals "5" and "1,234." equals "1234"."""
  def fold(s: str) -> str:
    return s.lower().translate(_NO_ASCII_PUNCT)
  return float(fold(prediction) == fold(gold))


def mgsm_scores(text: str, gold: metrics.Number,
                lang: str) -> dict[str, float]:
  """lm_eval_strict_match and lm_eval_flexible_extract of one generation."""
  if lang not in MGSM_STRICT:
    raise ValueError(f"lm-eval MGSM scoring has no answer pattern for {lang!r} "
                     f"(known: {', '.join(MGSM_STRICT)}); set "
                     "eval.lm_eval_compat=False")
  # The harness's target is the dataset's number as text: 18, never 18.0.
  target = metrics.format_number(gold)
  strict = regex_filter(text, MGSM_STRICT[lang])
  flexible = regex_filter(text, MGSM_FLEXIBLE, pick=-1)
  return {"lm_eval_strict_match": loose_exact_match(strict, target),
          "lm_eval_flexible_extract": loose_exact_match(flexible, target)}


# ---------------------------------------------------------------------------
# XNLI (lm-eval xnli_<lang>).

# (question word, entailment, neutral, contradiction word) per language.
XNLI_WORDS = {
    "en": ("right", "Yes", "Also", "No"),
    "de": ("richtig", "Ja", "Auch", "Nein"),
    "ru": ("правильно", "Да", "Так", "Нет"),
    "th": ("ถูกต้อง", "ใช่", "ดังนั้น", "ไม่"),
    "zh": ("正确", "是的", "所以", "不是的"),
}


def xnli_choices(premise: str, hypothesis: str,
                 lang: str) -> tuple[str, list[str]]:
  """(context, continuations for entailment, neutral, contradiction).

  The harness scores each whole text " {premise}, {qw}? {word}, {hypothesis}"
  (its target delimiter " " first) after BOS. The part up to "?" is the same in
  all three, so ranking only what follows it picks the same label, at a third
  of the cost: the context is run once.
  """
  if lang not in XNLI_WORDS:
    raise ValueError(f"lm-eval XNLI scoring has no template for {lang!r} "
                     f"(known: {', '.join(XNLI_WORDS)}); set "
                     "eval.lm_eval_compat=False")
  question, *words = XNLI_WORDS[lang]
  return (f" {premise}, {question}?",
          [f" {word}, {hypothesis}" for word in words])


# ---------------------------------------------------------------------------
# XQuAD: MLQA's script, and lm-eval's xquad_<lang> (transformers' SQuAD v1).

# Articles removed per language, as in the MLQA script; ru, th, zh have none.
MLQA_ARTICLES = {
    "en": re.compile(r"\b(a|an|the)\b"),
    "de": re.compile(
        r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b"),
}
# Scripts without spaces between words: each character of these is a token,
# other runs are split on whitespace (MLQA's "mixed segmentation"). zh is
# MLQA's own rule and range; th is ours (docs/tasks.md says why).
MLQA_CHAR_SCRIPTS = {"zh": re.compile(r"[\u4e00-\u9fa5]"),
                     "th": re.compile(r"[\u0e00-\u0e7f]")}
MLQA_LANGS = ("en", "de", "ru", "th", "zh")


def mixed_segmentation(text: str, lang: str) -> list[str]:
  """Characters of the language's script one by one, the rest by whitespace."""
  script = MLQA_CHAR_SCRIPTS.get(lang)
  if script is None:
    return text.split()
  tokens, run = [], []
  for ch in text:
    if script.match(ch):
      tokens += "".join(run).split() + [ch]
      run = []
    else:
      run.append(ch)
  return tokens + "".join(run).split()


def mlqa_normalize(text: str, lang: str) -> str:
  """Lower, drop punctuation (ASCII and Unicode P*), drop articles, then
  segment and join the tokens with single spaces."""
  if lang not in MLQA_LANGS:
    raise ValueError(f"MLQA scoring has no rule for {lang!r} (known: "
                     f"{', '.join(MLQA_LANGS)}); set eval.lm_eval_compat=False")
  text = "".join(ch for ch in text.lower() if not metrics.is_punct(ch))
  if lang in MLQA_ARTICLES:
    text = MLQA_ARTICLES[lang].sub(" ", text)
  return " ".join(mixed_segmentation(text, lang))


def bag_f1(prediction: Sequence[str], gold: Sequence[str]) -> float:
  """F1 of two token bags; 0 when they share nothing (also when both are
  empty, unlike our own F1)."""
  same = sum((collections.Counter(prediction) &
              collections.Counter(gold)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(prediction), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def mlqa_scores(prediction: str, golds: Sequence[str],
                lang: str) -> dict[str, float]:
  """mlqa_exact_match and mlqa_f1 in [0, 100], the max over gold answers."""
  pred = mlqa_normalize(prediction, lang)
  normed = [mlqa_normalize(g, lang) for g in golds]
  return {"mlqa_exact_match": 100 * max(float(pred == g) for g in normed),
          "mlqa_f1": 100 * max(bag_f1(pred.split(), g.split())
                               for g in normed)}


_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_v1_tokens(text: str) -> list[str]:
  """transformers' SQuAD normalisation in every language: lower, drop ASCII
  punctuation and English articles, split on whitespace."""
  text = text.lower().translate(_NO_ASCII_PUNCT)
  return _SQUAD_ARTICLES.sub(" ", text).split()


def lm_eval_xquad_scores(prediction: str,
                         golds: Sequence[str]) -> dict[str, float]:
  """lm_eval_exact_match and lm_eval_f1 in [0, 100], against the first gold
  only. Whitespace tokens: an unspaced zh or th answer is one token, so F1
  there is nearly exact match."""
  pred, gold = squad_v1_tokens(prediction), squad_v1_tokens(golds[0])
  f1 = float(pred == gold) if not pred or not gold else bag_f1(pred, gold)
  return {"lm_eval_exact_match": 100 * float(pred == gold),
          "lm_eval_f1": 100 * f1}

