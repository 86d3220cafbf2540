"""The eval stage: scores the base model and every finished checkpoint exactly once.

    python -m stt_jax.stages.evaluate --config=configs/mgsm_th.py --workdir=/path/to/workdir
    python -m stt_jax.evaluate ...      (the same; the name users know)

Runs beside training (on its own host if you like): it watches `workdir/runs/<variant>/
checkpoints/`, scores each new step on `eval.langs`, appends one row per metric to
`workdir/eval/metrics.jsonl` and exits once every variant's training has finished
(`runs/<variant>/train_done.json`) and all its checkpoints are scored. A file lock around
"check, score, append" keeps two evaluators from scoring the same checkpoint twice.
Multi-host: each host scores a slice of the test items on its local devices; process 0
merges the slices and writes.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from stt_jax import appendlog, cli, faults, hosts, preflight, scoring, sharding, tensorboard
from stt_jax import train as train_lib
from stt_jax.checkpoint import CheckpointError
from stt_jax.models import load_hf
from stt_jax.run_config import model_label
from stt_jax.stages import report
from stt_jax.tasks import get_task
from stt_jax.workdir import Workdir, read_json

BASE = "base"


class MetricsFile:
  """Append-only eval/metrics.jsonl (fsync'd per checkpoint), and what it already holds; with
  `events`, its rows as TensorBoard scalars too (eval/tensorboard/<variant>/), caught up at
  once with rows a crash kept from them."""

  def __init__(self, wd: Workdir, events: bool = False):
    self.dir, self.path, self.lock_path = wd.eval, wd.eval_metrics, wd.eval_lock
    os.makedirs(self.dir, exist_ok=True)
    self.events_of = wd.eval_tensorboard if events else None
    if self.events_of:
      with self.lock():
        tensorboard.sync_eval(appendlog.records(self.path), self.events_of)

  def scored(self, metric_names: Sequence[str]) -> set[tuple[str, int, str, str]]:
    """(variant, step, task, lang) keys that have a row for every one of `metric_names`; a
    key whose rows a killed writer left incomplete is scored again."""
    have = collections.defaultdict(set)
    for r in appendlog.records(self.path):
      have[(r["variant"], int(r["step"]), r["task"], r["lang"])].add(r["metric"])
    return {k for k, names in have.items() if names >= set(metric_names)}

  def append(self, rows: Sequence[dict]) -> None:
    """Appends whole rows; a torn last line left by a killed writer is cut off first. A key
    rescored because a kill left it incomplete keeps the rows it has: only the missing
    metrics are written, so no metric appears twice."""
    if rows:
      appendlog.cut_torn_tail(self.path)
      have = {_row_key(r) for r in appendlog.records(self.path)}
      rows = [r for r in rows if _row_key(r) not in have]
    if rows:
      appendlog.append(self.path, rows, "eval.append")
      if self.events_of:
        tensorboard.sync_eval(appendlog.records(self.path), self.events_of)

  @contextlib.contextmanager
  def lock(self):
    """Excludes other evaluators. Only process 0 takes it: the hosts of one evaluator work in
    lockstep (and would deadlock on it while process 0 waits for them in a collective)."""
    if jax.process_index() != 0:
      yield
      return
    with open(self.lock_path, "a") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f, fcntl.LOCK_UN)


def _row_key(row: dict) -> tuple:
  return row["variant"], int(row["step"]), row["task"], row["lang"], row["metric"]


def metric_names(cfg, task) -> tuple[str, ...]:
  """The metric rows one (model, language) gets: ours, plus the lm-eval-harness / MLQA ones
  when eval.lm_eval_compat is on."""
  return task.metric_names + (task.compat_metric_names if cfg.eval.lm_eval_compat else ())


def score_model(model, tokenizer, cfg, variant: str, step: int, wd: Workdir, mesh,
                metrics: MetricsFile) -> list[dict]:
  """Scores one model on every eval language not yet in metrics.jsonl; returns new rows."""
  task = get_task(cfg.task.name)
  names = metric_names(cfg, task)
  done = metrics.scored(names)
  # Process 0's view of what is left: each language below runs collectives on every host.
  langs = hosts.agree([lang for lang in cfg.eval.langs
                       if (variant, step, task.name, lang) not in done])
  rows = []
  for lang in langs:
    test = task.load("test", lang, limit=cfg.eval.limit, data_dir=cfg.task.data_dir,
                     source=cfg.task.data_source)
    if not test:
      raise ValueError(f"eval: no {task.name} test rows for language {lang!r}; check "
                       "eval.langs and task.data_dir")
    mine = test[jax.process_index()::jax.process_count()]
    res = scoring.score_split(model, tokenizer, task, mine, lang, method=cfg.eval.method,
                              batch_size=cfg.eval.batch_size,
                              max_new_tokens=cfg.eval.max_new_tokens, mesh=mesh,
                              desc=f"eval {variant}@{step} {lang}",
                              lm_eval_compat=cfg.eval.lm_eval_compat,
                              kv_dtype=cfg.model.kv_dtype or None)
    stopped = res["stopped"] or [None] * len(mine)  # None: loglik, nothing generated.
    choices = res["choices"] or [None] * len(mine)  # The compat pass's pick (XNLI), if any.
    gathered = _gather_predictions(
        [[p, s, c] for p, s, c in zip(res["predictions"], stopped, choices)],
        test, wd, variant, step, task.name, lang)
    if jax.process_index() != 0:
      continue
    preds, stopped, choices = ([g[k] for g in gathered] for k in range(3))
    truncated = stopped.count(False)  # Generations that hit eval.max_new_tokens, all hosts'.
    ranked = any(c is not None for c in choices)
    per_example = scoring.example_scores(task, preds, test, choices, cfg.eval.lm_eval_compat)
    _write_predictions(wd.predictions(variant, step, task.name, lang), test, preds, stopped,
                       choices, per_example)
    faults.point("eval.predictions_written")
    for name in names:
      values = [s[name] for s in per_example]
      lo, hi = scoring.bootstrap_ci(values)
      # A compat metric that ranks continuations (XNLI) generated nothing: no cut answers.
      by_rank = ranked and name in task.compat_metric_names
      rows.append({"variant": variant, "step": step, "task": task.name, "lang": lang,
                   "metric": name, "value": float(np.mean(values)), "ci_low": lo, "ci_high": hi,
                   "n": len(test), "seconds": round(res["seconds"], 2),
                   "model": model_label(cfg), "params": model.config.num_params(),
                   "method": "loglik" if by_rank else cfg.eval.method,
                   "truncated": 0 if by_rank else truncated, "time": time.time()})
    logging.info("eval %s@%d %s %s: %s", variant, step, task.name, lang,
                 {r["metric"]: round(r["value"], 4) for r in rows[-len(names):]})
  return rows


def _gather_predictions(mine: list, test, wd: Workdir, variant, step, task, lang) -> list:
  """All hosts' slices (JSON items, one per test row) in test order, via the shared workdir
  in multi-host runs."""
  count = jax.process_count()
  if count == 1:
    return mine
  part = wd.eval_parts(variant, step, task, lang)
  os.makedirs(part, exist_ok=True)
  with open(os.path.join(part, f"{jax.process_index()}.json"), "w", encoding="utf-8") as f:
    json.dump(mine, f, ensure_ascii=False)
  hosts.barrier(f"eval-{variant}-{step}-{lang}")
  preds = [None] * len(test)
  for i in range(count):
    with open(os.path.join(part, f"{i}.json"), encoding="utf-8") as f:
      preds[i::count] = json.load(f)
  return preds


def _write_predictions(path, test, preds, stopped, choices, per_example) -> None:
  """One row per test item; `stopped` (generation only) is False where the answer was cut
  by eval.max_new_tokens; `lm_eval_choice` is the continuation the compat pass ranked first
  (XNLI: 0 entailment, 1 neutral, 2 contradiction); `label`, a classification item's gold
  label (the report's accuracy per gold label)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  appendlog.write_atomic(path, "".join(
      json.dumps({"id": r["id"], "prediction": p, **({} if st is None else {"stopped": st}),
                  **({"label": r["label"]} if isinstance(r.get("label"), str) else {}),
                  **({} if c is None else {"lm_eval_choice": c}), **s},
                 ensure_ascii=False) + "\n"
      for r, p, st, c, s in zip(test, preds, stopped, choices, per_example)))


def _finished_step(wd: Workdir, variant: str) -> int | None:
  done = read_json(wd.train_done(variant))
  return None if done is None else int(done["step"])


def pending(cfg, wd: Workdir, metrics: MetricsFile) -> list[tuple[str, int]]:
  """(variant, step) pairs with a finished checkpoint that some eval language still lacks."""
  task = get_task(cfg.task.name)
  scored = metrics.scored(metric_names(cfg, task))
  out = []
  for variant in cfg.variants:
    ckpt_dir = wd.checkpoints(variant)
    if not os.path.isdir(ckpt_dir):
      continue
    steps = _finalized_steps(ckpt_dir)
    if cfg.eval.checkpoints == "final":
      final = _finished_step(wd, variant)
      steps = [s for s in steps if s == final]
    for step in steps:
      if any((variant, step, task.name, lang) not in scored for lang in cfg.eval.langs):
        out.append((variant, step))
  return out


def _finalized_steps(ckpt_dir: str) -> list[int]:
  """Steps orbax has finished writing (a tmp folder of an unfinished save has another name)."""
  return sorted(int(d) for d in os.listdir(ckpt_dir)
                if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d)))


def _agreed(items: list[tuple[str, int]]) -> list[tuple[str, int]]:
  """Process 0's list on every host, so all hosts score the same checkpoints in step."""
  return [(str(v), int(s)) for v, s in hosts.agree([list(k) for k in items])]


def run(cfg, wd: Workdir, tokenizer=None, *, wait: bool = True) -> int:
  """Scores what is pending; with `wait`, keeps polling until training has finished.
  Returns the number of (variant, step) checkpoints scored."""
  tokenizer = tokenizer or preflight.load_tokenizer(cfg.model.path)
  metrics = MetricsFile(wd, tensorboard.writer_on(cfg))
  mesh = sharding.local_mesh(cfg.mesh)
  scored = _score_base(cfg, wd, tokenizer, mesh, metrics) if cfg.eval.base_model else 0
  deadline = time.time() + cfg.eval.timeout_hours * 3600
  unreadable = set()  # Corrupt checkpoints: skipped by this process (a rerun tries again).
  todo = lambda: [k for k in pending(cfg, wd, metrics) if k not in unreadable]
  while True:
    for variant, step in _agreed(todo()):
      with metrics.lock():
        if not _agreed([(variant, step)] if (variant, step) in todo() else []):
          continue  # Another evaluator scored it meanwhile.
        if _score_checkpoint(cfg, wd, tokenizer, mesh, metrics, variant, step):
          scored += 1
        else:
          unreadable.add((variant, step))
    finished = hosts.agree(all(_finished_step(wd, v) is not None for v in cfg.variants))
    if not wait or (finished and not _agreed(todo())):
      return scored
    if hosts.agree(time.time() > deadline):
      raise TimeoutError(f"eval: training did not finish within eval.timeout_hours="
                         f"{cfg.eval.timeout_hours}; scored {scored} checkpoint(s)")
    time.sleep(cfg.eval.poll_seconds)


def _score_base(cfg, wd: Workdir, tokenizer, mesh, metrics: MetricsFile) -> int:
  """Scores the model before fine-tuning (variant 'base', step 0) once; returns 1 if it did."""
  task = get_task(cfg.task.name)
  with metrics.lock():
    done = metrics.scored(metric_names(cfg, task))
    todo = [(BASE, 0)] if any((BASE, 0, task.name, lang) not in done
                              for lang in cfg.eval.langs) else []
    if not _agreed(todo):
      return 0
    model, _ = load_hf(cfg.model.path, mesh=mesh, dtype=cfg.model.dtype,
                       param_dtype=cfg.model.param_dtype or None, layout="inference",
                       scan_layers=cfg.model.scan_layers, attention=cfg.model.attention)
    metrics.append(score_model(model, tokenizer, cfg, BASE, 0, wd, mesh, metrics))
    return 1


def _score_checkpoint(cfg, wd: Workdir, tokenizer, mesh, metrics: MetricsFile, variant: str,
                      step: int) -> bool:
  """Restores one checkpoint's weights (never its optimizer state) and scores it; False when
  it cannot be read on some host (every host then skips it)."""
  model, error = None, None
  try:
    model, _ = train_lib.load_trained(cfg.model.path, wd.run(variant), cfg, mesh=mesh,
                                      step=step, layout="inference")
  except CheckpointError as e:
    error = e
  if not hosts.all_hosts(error is None):  # One host that cannot read it: all skip.
    logging.warning("eval: skipping %s@%d: %s. Rerun the train stage (delete %s first) to "
                    "write it again", variant, step, error or "another host could not read it",
                    wd.train_done(variant))
    return False
  faults.point("eval.loaded")
  metrics.append(score_model(model, tokenizer, cfg, variant, step, wd, mesh, metrics))
  return True


def main(argv):
  """`python -m stt_jax.stages.evaluate`: the separate eval loop beside training."""
  del argv
  cli.quiet_logs()
  cfg, workdir = cli.setup()
  tokenizer = preflight.load_tokenizer(cfg.model.path)
  preflight.check(cfg, workdir, tokenizer, stages=("eval",))
  wd = Workdir(workdir)
  n = report.measured("eval", wd, lambda: run(cfg, wd, tokenizer, wait=True))
  logging.info("eval: scored %d checkpoint(s); metrics in %s", n, wd.eval_metrics)


if __name__ == "__main__":
  cli.run_entry_point("stt_jax.stages.evaluate", main)
