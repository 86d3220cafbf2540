"""The pipeline users run, end to end on a random tiny model: all stages, rerun = no-op, a
separate eval loop that scores each checkpoint exactly once, and bad configs."""

import collections
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from stt_jax import run_config
from stt_jax.models import safetensors_io
from tests import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["PYTHONPATH"] = ROOT
  return env


# Every variant, the round-trip one too (configs/tiny.py runs the default three).
ALL_VARIANTS = f"--config.variants={run_config.VARIANTS!r}"


def run_main(workdir, model, *extra, module="stt_jax.main", timeout=600, check=True):
  cmd = [sys.executable, "-m", module, "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.model.path={model}", *extra]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode:
    raise AssertionError(proc.stderr[-4000:])
  return proc


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  return make_tiny_model.main(str(tmp_path_factory.mktemp("tiny_model")))


def _metrics(workdir):
  with open(os.path.join(workdir, "eval", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _tree(workdir):
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, workdir)] = os.path.getmtime(path)
  return out


def test_tiny_all_stages_then_rerun_is_noop(tiny_model, tmp_path):
  workdir = str(tmp_path / "run")
  start = time.time()
  run_main(workdir, tiny_model, ALL_VARIANTS)
  assert time.time() - start < 180
  rows = _metrics(workdir)
  keys = collections.Counter((r["variant"], r["step"], r["lang"]) for r in rows)
  assert set(keys) == {(v, s, l) for v, s in [("base", 0)] + [
      (v, s) for v in ("zero_shot", "self_translate", "self_translate_cs",
                       "self_translate_rt") for s in (2, 4)]
                       for l in ("zh", "en")}
  # accuracy and lm_eval_acc (eval.lm_eval_compat), once per (variant, step, lang)
  assert set(keys.values()) == {2}
  assert {r["metric"] for r in rows} == {"accuracy", "lm_eval_acc"}
  for name in ("report.md", "report.csv", "report.png", "train_loss.png", "eval_curves.png",
               "translation_filters.png", "config.json",
               "translations/xnli_zh.train.jsonl", "translations/xnli_zh.stats.json",
               "translations/xnli_zh.train_rt.jsonl", "runs/self_translate/train_done.json",
               "runs/self_translate_rt/train_done.json"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "translations", "xnli_zh.train.jsonl")) as f:
    translated = [json.loads(line) for line in f]
  assert len(translated) == 12 and all(r["lang"] == "zh" for r in translated)
  with open(os.path.join(workdir, "translations", "xnli_zh.train_rt.jsonl")) as f:
    kept = [json.loads(line) for line in f]
  assert len(kept) == 6 and all(r in translated for r in kept)  # keep_fraction 0.5
  with open(os.path.join(workdir, "report.md")) as f:
    md = f.read()
  assert "#### xnli — Δ vs zero_shot (paired)" in md and "| self_translate_rt | zh |" in md
  assert "### Round-trip filter (self_translate_rt)" in md

  before = _tree(workdir)
  start = time.time()
  proc = run_main(workdir, tiny_model, ALL_VARIANTS)
  after = _tree(workdir)
  changed = {k for k in after if before.get(k) != after[k]}
  # Only the report is rewritten (and each stage's time and memory logged again); nothing is
  # translated, trained or scored again.
  assert changed <= {"report.md", "report.csv", "report.png", "train_loss.png",
                     "eval_curves.png", "translation_filters.png", "resources.jsonl"}, changed
  with open(os.path.join(workdir, "resources.jsonl")) as f:
    stages = [json.loads(line)["stage"] for line in f]
  assert stages == ["translate", "train", "export", "eval", "report"] * 2
  with open(os.path.join(workdir, "report.md")) as f:
    assert "### Time and memory per stage" in f.read()
  assert "already trained; skipping" in proc.stderr
  assert _metrics(workdir) == rows


def test_separate_eval_loop_scores_new_checkpoints_once(tiny_model, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  env = _env()
  evaluator = subprocess.Popen(
      [sys.executable, "-m", "stt_jax.evaluate", "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--config.model.path={tiny_model}",
       "--config.variants=('zero_shot',)"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    time.sleep(5)  # The loop is up and waiting before any checkpoint exists.
    run_main(workdir, tiny_model, "--config.stages=('translate','train')",
             "--config.variants=('zero_shot',)")
    _, err = evaluator.communicate(timeout=300)
  finally:
    evaluator.kill()
  assert evaluator.returncode == 0, err[-3000:]
  keys = collections.Counter((r["variant"], r["step"], r["lang"]) for r in _metrics(workdir))
  assert keys == collections.Counter(
      {(v, s, l): 2 for v, s in (("base", 0), ("zero_shot", 2), ("zero_shot", 4))
       for l in ("zh", "en")})
  # Running the loop again finds nothing to do and exits.
  proc = run_main(workdir, tiny_model, "--config.variants=('zero_shot',)",
                  module="stt_jax.evaluate")
  assert len(_metrics(workdir)) == 12, proc.stderr[-2000:]


@pytest.mark.parametrize("override,message", [
    ("--config.train.lrr=0.1", "config: unknown key 'train.lrr' (from --config.train.lrr=0.1); "
     "did you mean 'train.lr'?"),
    ("--config.eval.method=beam", "'eval.method' = 'beam' is not one of generate, loglik"),
    ("--config.model.attention=cudnn", "error: model.attention='cudnn': cuDNN needs a GPU"),
])
def test_bad_config_is_one_clear_error(tiny_model, tmp_path, override, message):
  proc = run_main(str(tmp_path / "w"), tiny_model, override, check=False)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, model, *extra, module="stt_jax.main", timeout=500):
  """Runs `module` as 2 local processes x 2 CPU devices (gloo); returns their stderrs."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = _env()
    env.update(STT_JAX_COORDINATOR=f"127.0.0.1:{port}", STT_JAX_NUM_PROCESSES="2",
               STT_JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", module, "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.model.path={model}", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), errs[0][-3000:] + errs[1][-3000:]
  return errs


def test_two_process_run_matches_one_process(tiny_model, tmp_path):
  """Multi-host logic (translation slices, global-batch training, exports and eval slices
  written by process 0) on 2 local processes x 2 CPU devices with JAX's gloo collectives;
  then a rerun of one variant and a separate eval loop, where every host must take process
  0's decisions (done markers, what is scored, finished) or they deadlock. Two variants cover
  every multi-host path (both translation passes, training, exports, eval slices); the others
  differ only in their data mixture (test_tiny_all_stages_then_rerun_is_noop runs them)."""
  variants = "--config.variants=('self_translate', 'self_translate_rt')"
  _two_processes(tmp_path / "multi", tiny_model, variants)
  run_main(str(tmp_path / "single"), tiny_model, variants)
  multi, single = tmp_path / "multi", tmp_path / "single"
  for name in ("translations/xnli_zh.train.jsonl", "translations/xnli_zh.train_rt.jsonl",
               "translations/xnli_zh.roundtrip.jsonl"):
    assert (multi / name).read_text() == (single / name).read_text(), name
  pick = lambda rows: {(r["variant"], r["step"], r["lang"], r["metric"]): r["value"]
                       for r in rows}
  assert pick(_metrics(str(multi))) == pick(_metrics(str(single)))
  for variant in ("self_translate", "self_translate_rt"):
    losses = [[json.loads(line)["loss"] for line in open(w / "runs" / variant / "train" /
                                                         "metrics.jsonl")]
              for w in (multi, single)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    # Exports: process 0 wrote whole folders, with the weights of the one-process run.
    for name in ("merged/model.safetensors", "adapter/adapter_model.safetensors"):
      with safetensors_io.SafetensorsFile(str(multi / "exports" / variant / name)) as a, \
          safetensors_io.SafetensorsFile(str(single / "exports" / variant / name)) as b:
        assert a.keys() == b.keys()
        for key in a.keys():
          np.testing.assert_allclose(a.tensor(key), b.tensor(key), atol=1e-5)

  before = _tree(str(multi))
  only = "--config.variants=('self_translate',)"
  _two_processes(multi, tiny_model, only, "--config.stages=('translate','train','eval')")
  _two_processes(multi, tiny_model, only, module="stt_jax.evaluate", timeout=300)
  after = _tree(str(multi))
  # resources.jsonl: each run logs its stages' time and memory.
  changed = {k for k in before if after.get(k) != before[k]} - {"config.json", "resources.jsonl"}
  assert not changed and set(after) - set(before) <= {
      k for k in after if k.startswith("config.")}, (changed, set(after) - set(before))
