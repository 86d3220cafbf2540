"""The pipeline: translate -> train (each variant) -> eval -> report, from one config.

    python -m stt_jax.main --config=configs/mgsm_th.py --workdir=/path/to/workdir \
        [--config.train.lr=1e-4 ...]

Every stage resumes where it stopped, so rerunning the same command continues an interrupted
run, and rerunning a finished one does nothing new. Run from the repository root (config
files import `configs.base`). Multi-host (TPU pod slices): run the same command on every host;
`jax.distributed.initialize()` is called when the environment says so (see launch/).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app

from stt_jax import cli, faults, hosts


def run_translate(cfg, workdir, tokenizer) -> None:
  from configs import base  # pylint: disable=g-import-not-at-top
  from stt_jax import evaluate, translate  # pylint: disable=g-import-not-at-top
  from stt_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  if not any(v != "zero_shot" for v in cfg.variants):
    return
  mesh = evaluate.local_mesh(cfg)
  section = base.translate_section(cfg)
  model = None
  for lang in cfg.task.target_langs:
    marker = _translate_marker(workdir, cfg, lang)
    stamp = _translate_stamp(cfg, section, lang)
    if hosts.agree(_read_json(marker) == stamp):  # Process 0 decides for every host.
      logging.info("main: translations for %s are up to date; skipping", lang)
      continue
    if model is None:
      model, _ = load_hf(cfg.model.path, mesh=mesh, dtype=cfg.model.dtype,
                         param_dtype=cfg.model.param_dtype or None)
    stats = translate.translate_task(model, tokenizer, cfg.task.name, lang, section, workdir,
                                     mesh=mesh)
    logging.info("main: translated %s: kept %s of %s", lang, stats.get("kept"),
                 stats.get("items"))
    if hosts.is_main():
      faults.point("main.translated")
      _write_json(marker, stamp)
    hosts.barrier(f"translate-{lang}-marked")  # Every host sees the marker from here on.


def _translate_marker(workdir, cfg, lang) -> str:
  from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  name = f"{get_task(cfg.task.name).name}_{lang}"
  return os.path.join(workdir, "translations", f"{name}.done.json")


def _translate_stamp(cfg, section, lang) -> dict:
  """What the translation files depend on: a changed setting makes the stage run again (it
  reuses every cached segment, so only new sources are decoded)."""
  return {"model": os.path.abspath(cfg.model.path), "task": cfg.task.name, "lang": lang,
          "translate": json.loads(json.dumps(section.to_dict(), sort_keys=True, default=str))}


def _translated(workdir, cfg, lang) -> bool:
  return os.path.isfile(_translate_marker(workdir, cfg, lang))


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _write_json(path: str, obj) -> None:
  from stt_jax import appendlog  # pylint: disable=g-import-not-at-top
  appendlog.write_atomic(path, json.dumps(obj, sort_keys=True))


def rows_by_source(cfg, workdir) -> dict[str, list[dict]]:
  """English train rows + every target language's translated and code-switched rows."""
  from stt_jax import train_data  # pylint: disable=g-import-not-at-top
  from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  task = get_task(cfg.task.name)
  out = {"en": list(task.load("train", "en", limit=cfg.task.train_limit,
                              data_dir=cfg.task.data_dir, source=cfg.task.data_source,
                              sample_seed=cfg.task.train_sample_seed,
                              allow_subset=cfg.task.allow_subset)),
         "translated": [], "code_switched": []}
  for lang in cfg.task.target_langs:
    for source, suffix in (("translated", "train"), ("code_switched", "cs")):
      path = os.path.join(workdir, "translations", f"{task.name}_{lang}.{suffix}.jsonl")
      if os.path.isfile(path):
        out[source] += train_data.read_rows(path)
  return out


def run_train(cfg, workdir, tokenizer) -> None:
  import ml_collections  # pylint: disable=g-import-not-at-top
  from stt_jax import evaluate, sharding  # pylint: disable=g-import-not-at-top
  from stt_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from stt_jax import train_data  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp,
                             "tensor": cfg.mesh.tensor})
  rows = None
  for variant in cfg.variants:
    marker = evaluate.done_marker(workdir, variant)
    if hosts.agree(os.path.isfile(marker)):
      logging.info("main: %s already trained; skipping", variant)
      continue
    if variant != "zero_shot":
      missing = hosts.agree([l for l in cfg.task.target_langs
                             if not _translated(workdir, cfg, l)])
      if missing:
        from stt_jax import preflight  # pylint: disable=g-import-not-at-top
        raise preflight.PreflightError(
            f"main: variant {variant} needs translations for {missing}; run the 'translate' "
            "stage first (config.stages)")
    rows = rows if rows is not None else rows_by_source(cfg, workdir)
    sections = ml_collections.ConfigDict({"train": cfg.train.to_dict(),
                                          "checkpoint": cfg.checkpoint.to_dict()})
    result = train_lib.train(cfg.model.path, tokenizer, cfg.task.name,
                             train_data.rows_for_variant(variant, rows),
                             sections, evaluate.run_dir(workdir, variant), mesh)
    if result.preempted:
      logging.warning("main: %s preempted at step %d; rerun to continue", variant, result.step)
      sys.exit(143)
    if hosts.is_main():
      faults.point("main.trained")
      _write_json(marker, {"step": result.step, "metrics": result.metrics})
    hosts.barrier(f"train-{variant}-marked")
    del result


@cli.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_logs()
  cfg, workdir = cli.setup()
  from stt_jax import preflight  # pylint: disable=g-import-not-at-top
  tokenizer = preflight.load_tokenizer(cfg.model.path)
  preflight.check(cfg, workdir, tokenizer)
  stages = list(cfg.stages)
  if "translate" in stages:
    run_translate(cfg, workdir, tokenizer)
  if "train" in stages:
    run_train(cfg, workdir, tokenizer)
  if "eval" in stages:
    from stt_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.run(cfg, workdir, tokenizer, wait=False)
  if "report" in stages:
    if hosts.is_main():
      from stt_jax import report  # pylint: disable=g-import-not-at-top
      print(report.write_report([workdir]))
      print(f"report: {os.path.join(workdir, 'report.md')}, report.png")


if __name__ == "__main__":
  from stt_jax import supervisor  # pylint: disable=g-import-not-at-top
  if supervisor.multi_process(sys.argv):
    sys.exit(supervisor.run("stt_jax.main", sys.argv))
  app.run(main, flags_parser=cli.parse_flags)
