"""The pipeline's stages, one module each, run in `cfg.stages` order by stt_jax.main.

Each stage is `run(cfg, wd, tokenizer)` over a validated run config (stt_jax.run_config) and a
run folder (stt_jax.workdir.Workdir); each resumes where it stopped and is multi-host aware.
The library below them (models, decode, train, translate, tasks, ...) knows no stage.
`run` also records each stage's wall time and resident peak (stt_jax.memory) in
`workdir/resources.jsonl`, which the report shows (stages.report.measured).
"""

from __future__ import annotations

from stt_jax.stages import evaluate, export, report, train, translate

# config.stages name -> the stage's module.
STAGES = {"translate": translate, "train": train, "export": export, "eval": evaluate,
          "report": report}


def run(name: str, cfg, wd, tokenizer):
  """Runs one stage of the pipeline, its time and memory logged (`report.measured`); returns
  what the stage returns."""
  return report.measured(name, wd, lambda: STAGES[name].run(cfg, wd, tokenizer))
