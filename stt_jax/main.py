"""The pipeline: translate -> train (each variant) -> eval -> report, from one config.

    python -m stt_jax.main --config=configs/mgsm_th.py --workdir=/path/to/workdir \
        [--config.train.lr=1e-4 ...]

Every stage resumes where it stopped, so rerunning the same command continues an interrupted
run, and rerunning a finished one does nothing new. Each stage is one module of
`stt_jax.stages`. Multi-host (TPU pod slices): run the same command on every host;
`jax.distributed.initialize()` is called when the environment says so (see launch/).
"""

from __future__ import annotations

from absl import app

from stt_jax import cli


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_logs()
  cfg, workdir = cli.setup()
  from stt_jax import preflight, stages  # pylint: disable=g-import-not-at-top
  from stt_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top
  tokenizer = preflight.load_tokenizer(cfg.model.path)
  preflight.check(cfg, workdir, tokenizer)
  wd = Workdir(workdir)
  for name in cfg.stages:
    stages.run(name, cfg, wd, tokenizer)


if __name__ == "__main__":
  cli.run_entry_point("stt_jax.main", main)
