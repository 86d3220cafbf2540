"""Every path, marker and stamp of a run folder, in one place.

    workdir/config.json                          the resolved config (older ones: config.<t>.json)
    workdir/translations/<task>_<lang>.train.jsonl   translated rows (translate stage)
                         <task>_<lang>.cs.jsonl      code-switched rows
                         <task>_<lang>.train_rt.jsonl   rows passing the round-trip filter
                         <task>_<lang>.roundtrip.jsonl  per kept row: back-translations, chrF
                         <task>_<lang>.stats.json    counts, drops by reason, throughput
                         <task>_<lang>.done.json     marker: the settings the files were made with
                         cache/<task>_<lang>.part<host>.jsonl   resumable decode cache
                         cache/<task>_<lang>.back.part<host>.jsonl   the round-trip pass's
    workdir/runs/<variant>/checkpoints/<step>/   Orbax (train stage; train.train's layout)
                           train/metrics.jsonl   one row per log step
                           train/events.out.tfevents.stt_jax   the same, for TensorBoard
                           train_done.json       marker: final step and metrics
    workdir/eval/metrics.jsonl                   one row per (variant, step, task, lang, metric)
                 predictions/<variant>-<step>-<task>-<lang>.jsonl
                 parts/<variant>-<step>-<task>-<lang>/<host>.json   multi-host hand-over
                 tensorboard/<variant>/events.out.tfevents.stt_jax   metrics, for TensorBoard
                 .lock                           one evaluator scores a checkpoint at a time
    workdir/exports/<variant>/merged/            HF folder of the final checkpoint (export stage)
                              adapter/           PEFT LoRA adapter (LoRA runs)
                              export.json        marker: the checkpoint exported
    workdir/resources.jsonl                      one row per run of a stage: wall time, peak RSS
    workdir/report.md, report.csv, report.png
            train_loss.png, eval_curves.png, translation_filters.png   (report_figure)

Stages ask this module for a path and never join names themselves, so the layout can change
in one file. Task names are canonical (`get_task(name).name`), never aliases.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from stt_jax import appendlog


@dataclasses.dataclass(frozen=True)
class Workdir:
  root: str

  def __post_init__(self):
    object.__setattr__(self, "root", os.path.abspath(os.fspath(self.root)))

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  @property
  def config(self) -> str:
    return self.path("config.json")

  def config_backup(self, stamp: int) -> str:
    """Where a rerun with another config keeps the one the run started with."""
    return self.path(f"config.{stamp}.json")

  # --------------------------------------------------------------------------- translate

  @property
  def translations(self) -> str:
    return self.path("translations")

  def translation(self, task: str, lang: str, kind: str) -> str:
    """kind: 'train' | 'cs' | 'train_rt' | 'roundtrip' (jsonl rows), 'stats' | 'done' (json)."""
    ext = "jsonl" if kind in ("train", "cs", "train_rt", "roundtrip") else "json"
    return os.path.join(self.translations, f"{task}_{lang}.{kind}.{ext}")

  def translation_stats(self) -> list[str]:
    """Every language's stats file (translate stage), sorted."""
    folder, end = self.translations, ".stats.json"
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names if n.endswith(end)]

  @property
  def translation_cache(self) -> str:
    return os.path.join(self.translations, "cache")

  @staticmethod
  def cache_name(task: str, lang: str, back: bool = False) -> str:
    """A decode cache's name in `translation_cache` (back: the round-trip pass, target ->
    English)."""
    return f"{task}_{lang}.back" if back else f"{task}_{lang}"

  # --------------------------------------------------------------------------- train

  def run(self, variant: str) -> str:
    """The folder train.train works in for one variant."""
    return self.path("runs", variant)

  def checkpoints(self, variant: str) -> str:
    return os.path.join(self.run(variant), "checkpoints")

  def train_log(self, variant: str) -> str:
    return os.path.join(self.run(variant), "train", "metrics.jsonl")

  def train_done(self, variant: str) -> str:
    return os.path.join(self.run(variant), "train_done.json")

  def variants_trained(self) -> list[str]:
    """Variants with a run folder (any state), sorted."""
    runs = self.path("runs")
    return sorted(os.listdir(runs)) if os.path.isdir(runs) else []

  # --------------------------------------------------------------------------- eval

  @property
  def eval(self) -> str:
    return self.path("eval")

  @property
  def eval_metrics(self) -> str:
    return os.path.join(self.eval, "metrics.jsonl")

  @property
  def eval_lock(self) -> str:
    return os.path.join(self.eval, ".lock")

  def eval_tensorboard(self, variant: str) -> str:
    """One TensorBoard run per variant (the base model too), beside the train runs' folders."""
    return os.path.join(self.eval, "tensorboard", variant)

  def predictions(self, variant: str, step: int, task: str, lang: str) -> str:
    return os.path.join(self.eval, "predictions", f"{variant}-{step}-{task}-{lang}.jsonl")

  def eval_parts(self, variant: str, step: int, task: str, lang: str) -> str:
    return os.path.join(self.eval, "parts", f"{variant}-{step}-{task}-{lang}")

  # --------------------------------------------------------------------------- export

  def export(self, variant: str) -> str:
    """exports/<variant>/: merged/, adapter/ and export.json, written as one folder."""
    return self.path("exports", variant)

  def export_tmp(self, variant: str) -> str:
    """Where the export stage writes a variant's folder before renaming it into place."""
    return self.path("exports", f"{variant}.tmp")

  def export_done(self, variant: str) -> str:
    return os.path.join(self.export(variant), "export.json")

  # --------------------------------------------------------------------------- report

  def report(self, ext: str) -> str:
    """ext: 'md' | 'csv' | 'png'."""
    return self.path(f"report.{ext}")

  def report_figure(self, name: str) -> str:
    """A picture beside report.md (stt_jax.report_plots names them)."""
    return self.path(f"{name}.png")

  @property
  def resources(self) -> str:
    """A row per run of a stage (seconds, peak and end RSS of process 0; written by
    stages.report.measured for stt_jax.stages.run and the separate eval loop)."""
    return self.path("resources.jsonl")


def read_json(path: str) -> Any:
  """The JSON in `path`, or None when it is missing or unreadable (a marker not yet written)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def write_marker(path: str, obj: Any) -> None:
  """A marker (or stamp) written atomically: readers see all of it or none."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  appendlog.write_json(path, obj, indent=None)


def translate_stamp(model_path: str, task: str, lang: str, section: dict) -> dict:
  """What a language's translation files depend on: a changed setting makes the stage run
  again (it reuses every cached segment, so only new sources are decoded)."""
  return {"model": os.path.abspath(model_path), "task": task, "lang": lang,
          "translate": json.loads(json.dumps(section, sort_keys=True, default=str))}
