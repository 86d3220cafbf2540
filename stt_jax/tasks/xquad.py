"""Extractive QA: train on SQuAD v1.1 (English), test on XQuAD.

The model generates the answer span as text; the metric is SQuAD-style exact
match and token F1, over characters for zh and th.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from stt_jax.tasks import base
from stt_jax.tasks import compat
from stt_jax.tasks import metrics


def squad_answers(record: Mapping[str, Any]) -> list[dict[str, Any]]:
  """`answers` as a list of {text, answer_start}.

  Local files store a list of dicts; HF `datasets` and TFDS store a dict of
  lists ({"text": [...], "answer_start": [...]}).
  """
  answers = record.get("answers")
  if isinstance(answers, Mapping):
    answers = [{"text": t, "answer_start": s} for t, s in
               zip(answers.get("text", []), answers.get("answer_start", []))]
  if not isinstance(answers, list) or not answers:
    raise base.MalformedRow("missing field 'answers' (a non-empty list)")
  parsed = []
  for answer in answers:
    if not isinstance(answer, Mapping):
      raise base.MalformedRow("an answer is not an object")
    start = answer.get("answer_start", -1)
    parsed.append({"text": base.text(answer, "text"),
                   "answer_start": start if isinstance(start, int) else -1})
  return parsed


class Xquad(base.Task):
  """SQuAD v1.1 -> XQuAD."""
  name = "xquad"
  aliases = ("squad",)
  splits = {
      "train": base.Split(
          "squad/train.jsonl", "squad", langs=("en",),
          hf=("rajpurkar/squad", None, "train"), tfds=("squad/v1.1", "train"),
          bundled_note="partial (4370 of 87599 questions; see data/SOURCES.md)"
                       "; use source='hf' or a data_dir for the full set"),
      "test": base.Split(
          "xquad/xquad_{lang}.jsonl", "xquad",
          hf=("google/xquad", "xquad.{lang}", "validation"),
          tfds=("xquad/{lang}", "test")),
  }
  translatable_fields = (
      base.Field("context", multiline=True,
                 note="one paragraph (no newlines in SQuAD train; a few "
                      "XQuAD en/de contexts have them)"),
      base.Field("question"),
      base.Field("answer",
                 note="answers[0].text; after translation answer_start is "
                      "where it occurs in the translated context, or -1"),
  )
  prompt_template = "Context: {context}\nQuestion: {question}\nAnswer:"
  metric_names = ("exact_match", "f1")
  compat_metric_names = ("mlqa_f1", "mlqa_exact_match", "lm_eval_f1",
                         "lm_eval_exact_match")

  def parse_row(self, record: Mapping[str, Any], split: str,
                lang: str) -> base.Example:
    return {"title": record.get("title") or "",
            "context": base.text(record, "context"),
            "question": base.text(record, "question"),
            "answers": squad_answers(record)}

  def get_text(self, example: base.Example, field: str) -> str:
    if field == "answer":
      return example["answers"][0]["text"]
    return super().get_text(example, field)

  def set_text(self, example: base.Example, field: str, value: str) -> None:
    if field == "answer":
      example["answers"] = [{"text": value, "answer_start": -1}]
    else:
      super().set_text(example, field, value)

  def with_translations(self, example: base.Example,
                        texts: Mapping[str, str], lang: str) -> base.Example:
    """Also re-locates each answer in the (translated) context; -1 if absent,
    which the translate stage uses to drop or fuzzy-align the example."""
    translated = super().with_translations(example, texts, lang)
    if {"context", "answer"} & set(texts):
      for answer in translated["answers"]:
        answer["answer_start"] = translated["context"].find(answer["text"])
    return translated

  def format_target(self, example: base.Example) -> str:
    return " " + example["answers"][0]["text"]

  def extract_answer(self, text: str, lang: str = "en") -> str:
    return metrics.first_line(text)

  def example_scores(self, prediction: str,
                     example: base.Example) -> dict[str, float]:
    answer, lang = self.extract_answer(prediction), example["lang"]
    golds = [a["text"] for a in example["answers"]]
    return {
        "exact_match": 100 * metrics.max_over_golds(
            metrics.exact_match, answer, golds, lang),
        "f1": 100 * metrics.max_over_golds(
            metrics.token_f1, answer, golds, lang),
    }

  def compat_scores(self, prediction: str, example: base.Example,
                    choice: Optional[int] = None) -> dict[str, float]:
    """MLQA's EM/F1 and lm-eval xquad_<lang>'s, on the same answer line."""
    del choice  # Read from the generation, not ranked.
    answer = self.extract_answer(prediction)
    golds = [a["text"] for a in example["answers"]]
    return {**compat.mlqa_scores(answer, golds, example["lang"]),
            **compat.lm_eval_xquad_scores(answer, golds)}
