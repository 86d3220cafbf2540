"""XNLI/MultiNLI on the bundled rows: labels, parallelism, both scorers."""

import collections
import re

import pytest

from stt_jax.tasks import get_task
from stt_jax.tasks import xnli

LANGS = ("en", "de", "ru", "th", "zh")
TASK = get_task("xnli")


@pytest.mark.parametrize("split", ["dev", "test"])
@pytest.mark.parametrize("lang", LANGS)
def test_label_balance(split, lang):
  rows = TASK.load(split, lang, strict=True)
  assert len(rows) == {"dev": 2490, "test": 5010}[split]
  counts = collections.Counter(r["label"] for r in rows)
  assert set(counts) == set(xnli.LABELS)
  for n in counts.values():
    assert abs(n / len(rows) - 1 / 3) < 0.01


def test_train_labels_balanced():
  rows = TASK.load("train", strict=True)
  assert collections.Counter(r["label"] for r in rows) == {
      "entailment": 3000, "neutral": 3000, "contradiction": 3000}


def _premise_starts(rows):
  return [i for i in range(1, len(rows))
          if rows[i]["premise"] != rows[i - 1]["premise"]]


def _numbers(row):
  return set(re.findall(r"\d+", row["premise"] + " " + row["hypothesis"]))


@pytest.mark.parametrize("split", ["dev", "test"])
def test_rows_are_parallel_across_languages_by_row_index(split):
  """Row k is the same premise/hypothesis pair in every language."""
  rows = {lang: TASK.load(split, lang) for lang in LANGS}
  en = rows["en"]
  for lang in LANGS:
    other = rows[lang]
    assert [r["id"] for r in other] == [r["id"] for r in en]
    assert [r["label"] for r in other] == [r["label"] for r in en]
    # Premises change (each has 3 hypotheses) at exactly the same rows.
    assert _premise_starts(other) == _premise_starts(en)
    # Numbers in the English row mostly reappear in the same row, but not
    # in a row with another premise (3 rows later).
    with_digits = [i for i, r in enumerate(en) if _numbers(r)]
    same = sum(bool(_numbers(en[i]) & _numbers(other[i])) for i in with_digits)
    shifted = sum(bool(_numbers(en[i]) & _numbers(other[(i + 3) % len(en)]))
                  for i in with_digits)
    assert same >= 0.85 * len(with_digits), (lang, same, len(with_digits))
    assert shifted <= 0.05 * len(with_digits)


def test_load_parallel_dev():
  pairs = TASK.load_parallel("dev", ["en", "th"], limit=6)
  assert len(pairs) == 6
  en, th = pairs[0]
  assert en["id"] == th["id"] == "xnli-dev-1"
  assert en["premise"] == "And he said, Mama, I'm home."


def test_prompt_and_target_exact_strings():
  row = TASK.load("dev", "en", limit=1)[0]
  assert TASK.format_prompt(row) == (
      "Premise: And he said, Mama, I'm home.\n"
      "Hypothesis: He called his mom as soon as the school bus dropped him "
      "off.\nLabel:")
  assert TASK.format_target(row) == " neutral"
  train = TASK.load("train", limit=1)[0]
  assert TASK.format_prompt(train).endswith(
      "\nHypothesis: You lose the things to the following level if the "
      "people recall .\nLabel:")
  assert TASK.format_target(train) == " entailment"


# (model output, lang, label)
EXTRACTION_CASES = [
    (" entailment", "en", "entailment"),
    (" Neutral\nPremise: ...", "en", "neutral"),
    (" contradiction.", "de", "contradiction"),
    (" Widerspruch", "de", "contradiction"),
    (" Folgerung", "de", "entailment"),
    (" противоречие", "ru", "contradiction"),
    (" Нейтрально", "ru", "neutral"),
    (" следование", "ru", "entailment"),
    (" ขัดแย้ง", "th", "contradiction"),
    (" เป็นกลาง", "th", "neutral"),
    (" 矛盾", "zh", "contradiction"),
    (" 蕴含", "zh", "entailment"),
    (" 中立", "zh", "neutral"),
    (" The hypothesis contradicts the premise", "en", "contradiction"),
    (" I am not sure", "en", None),
]


@pytest.mark.parametrize("text,lang,expected", EXTRACTION_CASES)
def test_extract_answer(text, lang, expected):
  assert TASK.extract_answer(text, lang) == expected


def test_generated_label_accuracy():
  rows = TASK.load("test", "zh", limit=3)
  assert [r["label"] for r in rows] == [
      "contradiction", "entailment", "neutral"]
  assert TASK.score([" 矛盾", " entailment", " contradiction"], rows) == {
      "accuracy": pytest.approx(2 / 3)}


def test_loglik_scorer_picks_highest_scoring_label():
  rows = TASK.load("test", "de", limit=30)
  calls = []

  def gold_best(prompts, continuations):
    calls.append(len(prompts))
    gold = {TASK.format_prompt(r): r["label"] for r in rows}
    return [0.0 if c == " " + gold[p] else -5.0
            for p, c in zip(prompts, continuations)]

  assert TASK.rank_labels(rows, gold_best) == [r["label"] for r in rows]
  assert TASK.score_loglik(rows, gold_best) == {"accuracy": 1.0}
  assert calls == [90, 90]  # one batched call: 30 prompts x 3 labels

  def prefers_neutral(prompts, continuations):
    return [-1.0 if c == " neutral" else -2.0 for c in continuations]

  balanced = TASK.load("test", "en")
  assert TASK.score_loglik(balanced, prefers_neutral) == {
      "accuracy": pytest.approx(1 / 3)}


def test_loglik_ties_go_to_first_label_and_bad_lengths_raise():
  row = TASK.load("dev", "en", limit=1)
  assert TASK.rank_labels(row, lambda p, c: [0.0] * len(p)) == ["entailment"]
  with pytest.raises(ValueError, match="3 prompt/continuation pairs"):
    TASK.rank_labels(row, lambda p, c: [0.0])


def test_parse_label_accepts_ints_and_names():
  assert xnli.parse_label(2) == "contradiction"
  assert xnli.parse_label(" Neutral ") == "neutral"
  for bad in (-1, 3, "maybe", True):
    with pytest.raises(ValueError):
      xnli.parse_label(bad)
