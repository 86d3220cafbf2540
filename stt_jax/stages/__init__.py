"""The pipeline's stages, one module each, run in `cfg.stages` order by stt_jax.main.

Each stage is `run(cfg, wd, tokenizer)` over a validated run config (stt_jax.run_config) and a
run folder (stt_jax.workdir.Workdir); each resumes where it stopped and is multi-host aware.
The library below them (models, decode, train, translate, tasks, ...) knows no stage.
`run` also records each stage's wall time and resident peak (stt_jax.memory) in
`workdir/resources.jsonl`, which the report shows.
"""

from __future__ import annotations

import logging
import time

from stt_jax import appendlog, hosts, memory
from stt_jax.stages import evaluate, export, report, train, translate

# config.stages name -> the stage's module.
STAGES = {"translate": translate, "train": train, "export": export, "eval": evaluate,
          "report": report}


def run(name: str, cfg, wd, tokenizer) -> None:
  """Runs one stage of the pipeline and appends its resources row (process 0's numbers)."""
  start = time.perf_counter()
  with memory.Peak() as peak:
    STAGES[name].run(cfg, wd, tokenizer)
  row = {"stage": name, "seconds": round(time.perf_counter() - start, 1),
         "peak_rss_gib": round(peak.bytes / memory.GIB, 2),
         "end_rss_gib": round(peak.end_bytes / memory.GIB, 2), "peak_since": peak.since,
         "time": time.time()}
  logging.info("%s: %.0f s, peak RSS %.2f GiB (since %s start), %.2f GiB at the end", name,
               row["seconds"], row["peak_rss_gib"], peak.since, row["end_rss_gib"])
  if hosts.is_main():
    path = report.resources_path(wd)
    appendlog.cut_torn_tail(path)  # Left by a run killed while writing its row.
    appendlog.append(path, [row], "stages.resources")
