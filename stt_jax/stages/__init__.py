"""The pipeline's stages, one module each, run in `cfg.stages` order by stt_jax.main.

Each stage is `run(cfg, wd, tokenizer)` over a validated run config (stt_jax.run_config) and a
run folder (stt_jax.workdir.Workdir); each resumes where it stopped and is multi-host aware.
The library below them (models, decode, train, translate, tasks, ...) knows no stage.
"""

from __future__ import annotations

from stt_jax.stages import evaluate, export, report, train, translate

# config.stages name -> the stage's module.
STAGES = {"translate": translate, "train": train, "export": export, "eval": evaluate,
          "report": report}


def run(name: str, cfg, wd, tokenizer) -> None:
  """Runs one stage of the pipeline."""
  STAGES[name].run(cfg, wd, tokenizer)
