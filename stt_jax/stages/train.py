"""The train stage: fine-tune one model per variant on its mixture of English, translated and
code-switched rows, resumably.

  run(cfg, Workdir(workdir), tokenizer)

zero_shot trains on English only (the baseline); self_translate adds every target language's
translations; self_translate_cs adds the code-switched rows too; self_translate_rt trains on
English + the translations that passed the round-trip filter (train_data.rows_for_variant).
Each variant trains in `runs/<variant>/` (stt_jax.train.train: checkpoints, metrics) and gets a
`train_done.json` marker when finished, so a rerun skips it and the eval loop knows its final
step. On preemption the process exits with 143 after saving: rerun the same command.
"""

from __future__ import annotations

import logging
import os
import sys

from stt_jax import faults, hosts, sharding, train_data
from stt_jax import train as train_lib
from stt_jax.preflight import PreflightError
from stt_jax.stages import translate as translate_stage
from stt_jax.tasks import get_task
from stt_jax.workdir import Workdir, write_marker

log = logging.getLogger(__name__)


def rows_by_source(cfg, wd: Workdir) -> dict[str, list[dict]]:
  """English train rows + every target language's translated, code-switched and
  round-trip-filtered rows."""
  task = get_task(cfg.task.name)
  out = {"en": translate_stage.english_rows(cfg, task), "translated": [], "code_switched": [],
         "translated_rt": []}
  for lang in cfg.task.target_langs:
    for source, kind in (("translated", "train"), ("code_switched", "cs"),
                         ("translated_rt", "train_rt")):
      path = wd.translation(task.name, lang, kind)
      if os.path.isfile(path):
        out[source] += train_data.read_rows(path)
  return out


def run(cfg, wd: Workdir, tokenizer) -> None:
  """Trains every variant without a done marker; the translations must exist for all but
  zero_shot."""
  mesh = sharding.config_mesh(cfg.mesh)
  rows = None
  for variant in cfg.variants:
    marker = wd.train_done(variant)
    if hosts.agree(os.path.isfile(marker)):
      log.info("train: %s already trained; skipping", variant)
      continue
    if variant != "zero_shot":
      missing = hosts.agree([l for l in cfg.task.target_langs
                             if not translate_stage.done(cfg, wd, l)])
      if missing:
        raise PreflightError(f"main: variant {variant} needs translations for {missing}; run "
                             "the 'translate' stage first (config.stages)")
    if variant == translate_stage.ROUNDTRIP_VARIANT:
      missing = hosts.agree([l for l in cfg.task.target_langs if not os.path.isfile(
          wd.translation(get_task(cfg.task.name).name, l, "train_rt"))])
      if missing:
        raise PreflightError(f"main: variant {variant} needs the round-trip pass for {missing}; "
                             "rerun the 'translate' stage with self_translate_rt in "
                             "config.variants")
    rows = rows if rows is not None else rows_by_source(cfg, wd)
    result = train_lib.train(cfg.model.path, tokenizer, cfg.task.name,
                             train_data.rows_for_variant(variant, rows), cfg, wd.run(variant),
                             mesh)
    if result.preempted:
      log.warning("train: %s preempted at step %d; rerun to continue", variant, result.step)
      sys.exit(143)
    if hosts.is_main():
      faults.point("main.trained")
      write_marker(marker, {"step": result.step, "metrics": result.metrics})
    hosts.barrier(f"train-{variant}-marked")
    del result
