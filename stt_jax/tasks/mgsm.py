"""Math: train on GSM8K (English), test on MGSM (250 problems per language).

Target = step-by-step rationale ending in "The answer is N."; the metric is
accuracy of the final number.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from stt_jax.tasks import base
from stt_jax.tasks import compat
from stt_jax.tasks import metrics

# GSM8K calculator annotations, e.g. "48/2 = <<48/2=24>>24".
_CALCULATOR = re.compile(r"<<[^<>]*>>")
# Language-specific prefixes of the MGSM exemplars ("Question: ",
# "Schritt-für-Schritt-Antwort: ", "问题："): a short label before a colon.
_EXEMPLAR_PREFIX = re.compile(r"^[^\d:：\n]{1,40}[:：]\s*")


def answer_sentence(number: metrics.Number) -> str:
  return f"The answer is {metrics.format_number(number)}."


def gsm8k_rationale(answer: str) -> tuple[str, metrics.Number]:
  """GSM8K answer -> (rationale lines ending in the answer sentence, N).

  Calculator annotations and blank lines are dropped; the final "#### N"
  line becomes "The answer is N.".
  """
  steps, sep, final = answer.rpartition("####")
  if not sep:
    raise base.MalformedRow("answer has no '#### N' line")
  gold = metrics.parse_number(final)
  if gold is None:
    raise base.MalformedRow(f"final answer is not a number: {final.strip()!r}")
  lines = [_CALCULATOR.sub("", line).rstrip() for line in steps.splitlines()]
  lines = [line for line in lines if line.strip()] + [answer_sentence(gold)]
  return "\n".join(lines), gold


class Mgsm(base.Task):
  """GSM8K -> MGSM."""
  name = "mgsm"
  aliases = ("gsm8k",)
  splits = {
      "train": base.Split(
          "gsm8k/train.jsonl", "gsm8k-train", langs=("en",),
          hf=("openai/gsm8k", "main", "train"), tfds=("gsm8k", "train")),
      # GSM8K test; its first 250 questions are MGSM's.
      "gsm8k_test": base.Split(
          "gsm8k/test.jsonl", "gsm8k-test", langs=("en",),
          hf=("openai/gsm8k", "main", "test"), tfds=("gsm8k", "test")),
      "test": base.Split(
          "mgsm/mgsm_{lang}.jsonl", "mgsm",
          hf=("juletxara/mgsm", "{lang}", "test")),
      # 8 few-shot exemplars, parallel across languages by id.
      "exemplars": base.Split(
          "mgsm/exemplars_{lang}.jsonl", "mgsm-exemplar",
          hf=("juletxara/mgsm", "{lang}", "train")),
  }
  translatable_fields = (
      base.Field("question"),
      base.Field("rationale", multiline=True,
                 note="one reasoning step per line; the last line is the "
                      "answer sentence 'The answer is N.'"),
  )
  prompt_template = "Question: {question}\nAnswer:"
  stop_sequences = ("\n\n", "\nQuestion:")
  metric_names = ("accuracy",)
  compat_metric_names = ("lm_eval_strict_match", "lm_eval_flexible_extract")

  def parse_row(self, record: Mapping[str, Any], split: str,
                lang: str) -> base.Example:
    question = base.text(record, "question")
    if split in ("train", "gsm8k_test"):
      rationale, gold = gsm8k_rationale(base.text(record, "answer"))
      return {"question": question, "rationale": rationale,
              "answer_number": gold}
    gold = base.number(record, "answer_number")
    if split == "test":
      return {"question": question, "answer_number": gold}
    return {
        "question": _EXEMPLAR_PREFIX.sub("", question, count=1),
        "rationale": _EXEMPLAR_PREFIX.sub(
            "", base.text(record, "answer"), count=1),
        "answer_number": gold,
    }

  def format_target(self, example: base.Example) -> str:
    """The rationale, or just the answer sentence for MGSM test rows."""
    rationale = example.get("rationale")
    return " " + (rationale or answer_sentence(example["answer_number"]))

  def extract_answer(self, text: str, lang: str = "en") -> Any:
    return metrics.extract_number(text, lang)

  def example_scores(self, prediction: str,
                     example: base.Example) -> dict[str, float]:
    predicted = self.extract_answer(prediction, example["lang"])
    return {"accuracy": float(
        metrics.numbers_equal(predicted, example["answer_number"]))}

  def compat_scores(self, prediction: str, example: base.Example,
                    choice: Optional[int] = None) -> dict[str, float]:
    """lm-eval mgsm_native_cot_<lang>'s two filters on the generation."""
    del choice  # Read from the generation, not ranked.
    return compat.mgsm_scores(prediction, example["answer_number"],
                              example["lang"])
