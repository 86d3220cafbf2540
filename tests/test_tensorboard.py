"""TensorBoard event files mirror the jsonl logs: the train and eval stages on the tiny model
write scalars equal to metrics.jsonl (tags, steps, values) as TensorBoard itself reads them, a
resumed train run continues its one file with no step twice, the eval writer catches up rows a
crash kept from it, and logging.tensorboard=False writes no event file."""

from __future__ import annotations

import collections
import glob
import importlib.util
import logging
import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from tensorboard.backend.event_processing import event_accumulator

from stt_jax import appendlog, preflight, run_config, sharding, tensorboard, train
from stt_jax.stages import evaluate
from stt_jax.stages import train as train_stage
from stt_jax.workdir import Workdir
from tests import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  return make_tiny_model.main(str(tmp_path_factory.mktemp("tiny_model")))


def _config(model: str, **logging_section):
  """configs/tiny.py, zero_shot only, English eval on 4 items, MFU priced at 1 TFLOP/s."""
  spec = importlib.util.spec_from_file_location("tiny_config",
                                                os.path.join(ROOT, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.model.path = model
  cfg.variants = ("zero_shot",)
  cfg.train.log_every = 1
  cfg.train.peak_flops = 1e12  # CPUs have no table entry: without it mfu is null.
  cfg.eval.langs = ("en",)
  cfg.eval.limit = 4
  cfg.logging.update(logging_section)
  run_config.validate(cfg)
  return cfg


@pytest.fixture(scope="module")
def fast_stages(tmp_path_factory):
  """The stages on one device (a fraction of the 8-device compile time), compiling through a
  persistent cache in a temporary folder, so the second run of the same programs (switch
  off) loads them instead of compiling again."""
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  options = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
             "jax_persistent_cache_min_compile_time_secs": 0,
             "jax_persistent_cache_min_entry_size_bytes": 0}
  before = {name: getattr(jax.config, name) for name in options}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sharding, "config_mesh", lambda *_: mesh)
    patch.setattr(sharding, "local_mesh", lambda *_: mesh)
    for name, value in options.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()  # Read the options again at the next compile.
    try:
      yield
    finally:
      for name, value in before.items():
        jax.config.update(name, value)
      compilation_cache.reset_cache()


def _stages(cfg, wd: Workdir) -> None:
  tokenizer = preflight.load_tokenizer(cfg.model.path)
  train_stage.run(cfg, wd, tokenizer)
  evaluate.run(cfg, wd, tokenizer, wait=False)


def _board(logdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} as TensorBoard's reader loads the folder."""
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _train_want(log) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} of a train metrics.jsonl (a Workdir: its zero_shot run's)."""
  path = log.train_log("zero_shot") if isinstance(log, Workdir) else log
  want = collections.defaultdict(list)
  for row in appendlog.records(path):
    for name in tensorboard.TRAIN_SCALARS:
      if row.get(name) is not None:
        want[f"train/{name}"].append((row["step"], float(np.float32(row[name]))))
  return dict(want)


def _eval_want(wd: Workdir, variant: str) -> dict[str, list[tuple[int, float]]]:
  want = collections.defaultdict(list)
  for r in appendlog.records(wd.eval_metrics):
    if r["variant"] == variant:
      want[f"{r['task']}/{r['lang']}/{r['metric']}"].append((r["step"],
                                                              float(np.float32(r["value"]))))
  return {tag: sorted(points) for tag, points in want.items()}


def test_stages_write_the_jsonl_rows_as_events(tiny_model, tmp_path, fast_stages):
  cfg = _config(tiny_model)
  wd = Workdir(tmp_path / "run")
  _stages(cfg, wd)
  want = _train_want(wd)
  assert set(want) == {f"train/{n}" for n in tensorboard.TRAIN_SCALARS}
  assert [s for s, _ in want["train/loss"]] == [1, 2, 3, 4]
  assert _board(os.path.dirname(wd.train_log("zero_shot"))) == want
  for variant, steps in (("base", [0]), ("zero_shot", [2, 4])):
    points = _eval_want(wd, variant)  # Our accuracy and lm-eval's (eval.lm_eval_compat).
    assert set(points) == {"xnli/en/accuracy", "xnli/en/lm_eval_acc"}
    assert all([s for s, _ in p] == steps for p in points.values())
    assert _board(wd.eval_tensorboard(variant)) == _eval_want(wd, variant)
  assert sorted(os.listdir(wd.path("eval", "tensorboard"))) == ["base", "zero_shot"]

  # Rows appended to metrics.jsonl whose events a crash lost are written by the next evaluator;
  # a file that has them all is left alone.
  base = os.path.join(wd.eval_tensorboard("base"), tensorboard.FILE_NAME)
  with open(base, "rb") as f:
    before = f.read()
  os.remove(os.path.join(wd.eval_tensorboard("zero_shot"), tensorboard.FILE_NAME))
  assert evaluate.run(cfg, wd, wait=False) == 0
  assert _board(wd.eval_tensorboard("zero_shot")) == _eval_want(wd, "zero_shot")
  with open(base, "rb") as f:
    assert f.read() == before


def test_switched_off_no_event_files(tiny_model, tmp_path, fast_stages):
  cfg = _config(tiny_model, tensorboard=False)
  cfg.eval.base_model = False
  cfg.eval.checkpoints = "final"
  wd = Workdir(tmp_path / "run")
  _stages(cfg, wd)
  assert appendlog.records(wd.train_log("zero_shot")) and appendlog.records(wd.eval_metrics)
  assert glob.glob(os.path.join(wd.root, "**", "*tfevents*"), recursive=True) == []


def test_a_resumed_train_log_drops_the_steps_after_its_checkpoint_from_both_files(tmp_path):
  row = lambda step, tps: {"step": step, "loss": 1.0 / step, "loss_mean": 1.0, "lr": 0.1,
                           "grad_norm": 2.0, "tokens_per_s": tps, "mfu": None, "time": 5.0}
  path = str(tmp_path / "train" / "metrics.jsonl")
  log = train._MetricsLog(path, events=True)
  for step in (1, 2, 3, 4):
    log.write(row(step, None if step == 1 else 100.0 * step))
  with open(os.path.join(tmp_path, "train", tensorboard.FILE_NAME), "ab") as f:
    f.write(b"\x17\x00\x00\x00\x00\x00\x00\x00torn")  # A record cut by a kill.
  log = train._MetricsLog(path, events=True)  # The restarted run restored step 2 ...
  log.rewind(2)
  for step in (3, 4):  # ... and logs steps 3 and 4 again (its first without a throughput).
    log.write(row(step, None if step == 3 else 7.0))
  board = _board(tmp_path / "train")
  assert board == _train_want(path)
  assert board["train/tokens_per_s"] == [(2, 200.0), (4, 7.0)] and "train/mfu" not in board
  assert sorted(os.listdir(tmp_path / "train")) == ["events.out.tfevents.stt_jax",
                                                     "metrics.jsonl"]  # One file, continued.


def test_a_step_scored_late_keeps_the_file_in_step_order(tmp_path):
  rows = lambda step, value: [{"variant": "v", "step": step, "task": "t", "lang": "de",
                               "metric": "acc", "value": value, "time": 1.0 + step}]
  logdir = lambda variant: str(tmp_path / variant)
  tensorboard.sync_eval(rows(4, 0.5), logdir)
  tensorboard.sync_eval(rows(4, 0.5) + rows(2, 0.25), logdir)  # Step 2 rescored late.
  tensorboard.sync_eval(rows(4, 0.9), logdir)  # A (tag, step) already there: not again.
  # Appended after step 4, step 2 would make TensorBoard's data server drop step 4 (it reads a
  # restart there) and this reader list the points out of order.
  assert _board(tmp_path / "v") == {"t/de/acc": [(2, 0.25), (4, 0.5)]}


def test_missing_tensorboardx_is_one_warning_and_validate_checks_the_switch(monkeypatch,
                                                                            caplog):
  cfg = run_config.get_config()
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "tensorboardX" else find_spec(name, *a))
  tensorboard._have_tensorboardx.cache_clear()
  with caplog.at_level(logging.WARNING):
    assert not tensorboard.writer_on(cfg) and not tensorboard.writer_on(cfg)
  assert [r.getMessage() for r in caplog.records] == [
      "tensorboard: tensorboardX is not installed, so no TensorBoard event files are written; "
      "pip install tensorboardX, or pass --config.logging.tensorboard=False"]
  monkeypatch.undo()
  tensorboard._have_tensorboardx.cache_clear()
  assert tensorboard.writer_on(cfg)
  cfg.logging.tensorboard = False
  assert not tensorboard.writer_on(cfg)
  bad = ml_collections.ConfigDict({**cfg.to_dict(), "logging": {"tensorboard": "no"}})
  with pytest.raises(run_config.ConfigKeyError, match="'logging.tensorboard' must be a bool"):
    run_config.validate(bad)
