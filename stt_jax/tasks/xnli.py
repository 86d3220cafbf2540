"""NLI: train on MultiNLI (English), test on XNLI.

The model generates a label word, or the three label words are ranked by
log-likelihood; the metric is accuracy.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from stt_jax.tasks import base
from stt_jax.tasks import compat
from stt_jax.tasks import metrics

LABELS = metrics.LABELS  # HF/TFDS integer labels index this tuple.


def parse_label(value: Any) -> str:
  """'entailment' | 'neutral' | 'contradiction' from a name or 0/1/2."""
  if value is None:
    raise base.MalformedRow("missing field 'label'")
  if isinstance(value, int) and not isinstance(value, bool):
    if 0 <= value < len(LABELS):
      return LABELS[value]
  elif isinstance(value, str) and value.strip().lower() in LABELS:
    return value.strip().lower()
  raise base.MalformedRow(f"label {value!r} is not one of {LABELS} or 0/1/2")


def _pick_lang(value: Any, lang: str) -> Any:
  """TFDS xnli stores all 15 languages in one row; pick one."""
  if isinstance(value, Mapping) and "translation" in value:
    value = dict(zip(value["language"], value["translation"]))
  return value.get(lang) if isinstance(value, Mapping) else value


class Xnli(base.Task):
  """MultiNLI -> XNLI."""
  name = "xnli"
  aliases = ("mnli", "multi_nli")
  splits = {
      "train": base.Split(
          "mnli/train.jsonl", "mnli-train", langs=("en",),
          hf=("nyu-mll/multi_nli", None, "train"), tfds=("multi_nli", "train"),
          bundled_note="a 9000-row tokenised subset of MultiNLI train (see "
                       "data/SOURCES.md); use source='hf' or a data_dir for "
                       "the full set"),
      # Rows are parallel across languages by row number (so by id).
      "dev": base.Split(
          "xnli/xnli_dev_{lang}.jsonl", "xnli-dev",
          hf=("facebook/xnli", "{lang}", "validation"),
          tfds=("xnli", "validation")),
      "test": base.Split(
          "xnli/xnli_test_{lang}.jsonl", "xnli-test",
          hf=("facebook/xnli", "{lang}", "test"), tfds=("xnli", "test")),
  }
  translatable_fields = (base.Field("premise"), base.Field("hypothesis"))
  prompt_template = "Premise: {premise}\nHypothesis: {hypothesis}\nLabel:"
  metric_names = ("accuracy",)
  compat_metric_names = ("lm_eval_acc",)
  labels = LABELS

  def parse_row(self, record: Mapping[str, Any], split: str,
                lang: str) -> base.Example:
    fields = {k: _pick_lang(record.get(k), lang)
              for k in ("premise", "hypothesis")}
    return {**{k: base.text(fields, k) for k in fields},
            "label": parse_label(record.get("label"))}

  def format_target(self, example: base.Example) -> str:
    return " " + example["label"]

  def extract_answer(self, text: str, lang: str = "en") -> Optional[str]:
    """The first label word in `text`, in English or in `lang`."""
    return metrics.match_label(text, lang)

  def example_scores(self, prediction: str,
                     example: base.Example) -> dict[str, float]:
    predicted = self.extract_answer(prediction, example["lang"])
    return {"accuracy": float(predicted == example["label"])}

  def rank_labels(self, examples: Sequence[base.Example],
                  score_fn: metrics.ScoreFn) -> list[str]:
    """The label whose target (" entailment", ...) `score_fn` scores highest.

    score_fn(prompts, continuations) -> one log-likelihood per pair.
    """
    prompts = [self.format_prompt(e) for e in examples]
    targets = [" " + label for label in LABELS]
    return [LABELS[i] for i in metrics.rank_choices(prompts, targets,
                                                    score_fn)]

  def score_loglik(self, examples: Sequence[base.Example],
                   score_fn: metrics.ScoreFn) -> dict[str, float]:
    """Accuracy when the label is chosen by log-likelihood ranking."""
    predicted = self.rank_labels(examples, score_fn)
    return {"accuracy": metrics.mean(
        [float(p == e["label"]) for p, e in zip(predicted, examples)])}

  def compat_choices(self, example: base.Example) -> tuple[str, list[str]]:
    """lm-eval xnli_<lang>'s three sentences, split where they differ."""
    return compat.xnli_choices(example["premise"], example["hypothesis"],
                               example["lang"])

  def compat_scores(self, prediction: str, example: base.Example,
                    choice: Optional[int] = None) -> dict[str, float]:
    """lm_eval_acc: whether the ranked choice is the gold label; the
    generation (or our own label ranking) plays no part."""
    if choice is None:
      raise ValueError("lm_eval_acc needs the choice rank_compat_choices "
                       "picked")
    return {"lm_eval_acc": float(LABELS[choice] == example["label"])}
