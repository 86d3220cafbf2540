"""Shipped configs: they load as absl does and validate, paper ones use the full data,
per-language budgets, and the LR schedule as fractions of each run."""

import os

import ml_collections
import numpy as np
import pytest
from ml_collections import config_flags

from stt_jax import preflight, run_config
from stt_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
               if f.endswith(".py") and f != "__init__.py")
PAPER = [n for n in NAMES if n.split("_")[0] in ("mgsm", "xnli", "xquad")]
CPU = [n for n in NAMES if n not in PAPER]  # cpu_xnli, demo, demo_gemma, tiny: bundled subsets.


def _config(name):
  """The config file loaded by path, as `--config=configs/<name>.py` loads it."""
  return config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      f"{name}_config", os.path.join(ROOT, "configs", f"{name}.py")).get_config()


def test_every_shipped_config_loads_and_validates():
  assert len(PAPER) == 12 and sorted(CPU) == ["cpu_xnli", "demo", "demo_gemma", "tiny"]
  for name in NAMES:
    cfg = _config(name)
    run_config.validate(cfg)
    preflight.check_names(cfg)
    assert run_config.flatten(cfg).keys() == run_config.flatten(run_config.get_config()).keys()


def test_validate_names_the_key_and_the_nearest_one():
  cfg = run_config.get_config()
  cfg.train.method = "qlora"
  with pytest.raises(run_config.ConfigKeyError, match="'train.method' = 'qlora' is not one of"):
    run_config.validate(cfg)
  typo = run_config.get_config().to_dict()
  typo["train"]["lrr"] = 1e-3
  with pytest.raises(run_config.ConfigKeyError,
                     match=r"unknown key 'train.lrr'; did you mean 'train.lr'\?"):
    run_config.validate(ml_collections.ConfigDict(typo))
  for key, value, match in (("eval.batch_size", 0, "eval.batch_size=0 must be positive"),
                            ("train.grad_accum", 3, "multiple of train.grad_accum=3"),
                            ("train.lora.targets", "q_proj,qkv", "train.lora")):
    cfg = run_config.get_config()
    section, leaf = key.rsplit(".", 1)
    node = cfg
    for part in section.split("."):
      node = node[part]
    node[leaf] = value
    with pytest.raises(run_config.ConfigKeyError, match=match):
      run_config.validate(cfg)


def test_paper_configs_read_full_data_and_demo_tiny_opt_into_the_subset():
  assert len(PAPER) == 12
  for name in PAPER:
    cfg = _config(name)
    assert not cfg.task.allow_subset
    partial = cfg.task.name in ("xnli", "xquad")  # Bundled train copies are partial.
    assert cfg.task.data_source == ("hf" if partial else "auto"), name
    preflight.check_subset(preflight_task(cfg), "train", "en", cfg)  # Never refused.
  for name in CPU:
    assert _config(name).task.allow_subset


def preflight_task(cfg):
  from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  return get_task(cfg.task.name)


@pytest.mark.parametrize("task", ["xnli", "xquad"])
def test_preflight_refuses_the_bundled_subset_in_one_line(task, tmp_path):
  cfg = run_config.paper_config(task, "th")
  cfg.task.data_source = "auto"
  with pytest.raises(preflight.PreflightError) as e:
    preflight.check_data(cfg, ("train",))
  message = str(e.value)
  assert "\n" not in message and message.startswith("config: task.allow_subset=False")
  assert "--config.task.data_source=hf" in message
  assert "--config.task.allow_subset=True" in message
  cfg.task.allow_subset = True
  cfg.task.train_limit = 4
  preflight.check_data(cfg, ("train",))  # Opted in: the subset is fine.
  cfg.task.allow_subset = False
  spec = preflight_task(cfg).splits["train"]
  full = tmp_path / spec.path
  full.parent.mkdir(parents=True)
  full.write_text(base_row(task) + "\n", encoding="utf-8")
  cfg.task.data_dir = str(tmp_path)
  preflight.check_data(cfg, ("train",))  # The full file in data_dir.


def base_row(task):
  import json  # pylint: disable=g-import-not-at-top
  if task == "xnli":
    return json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral"})
  return json.dumps({"id": "q1", "title": "t", "context": "Paris is big.", "question": "Which?",
                     "answers": [{"text": "Paris", "answer_start": 0}]})


def test_thai_budgets_are_larger_than_english_sized_ones():
  for task in ("mgsm", "xnli", "xquad"):
    de, th, zh = (run_config.paper_config(task, lang) for lang in ("de", "th", "zh"))
    assert th.train.seq_len > de.train.seq_len, task
    assert th.translate.max_new_ratio > de.translate.max_new_ratio, task
    assert th.translate.max_new_tokens > de.translate.max_new_tokens, task
    assert zh.train.seq_len >= de.train.seq_len, task
    if task != "xnli":  # XNLI ranks label words; nothing is generated.
      assert th.eval.max_new_tokens > de.eval.max_new_tokens, task


def _lrs(t, total):
  _, schedule = train.make_optimizer(t, total)
  return np.asarray([float(schedule(round(f * total))) for f in np.linspace(0, 1, 21)])


def _train(**fields):
  cfg = run_config.get_config()
  cfg.train.update(fields)
  run_config.validate(cfg)
  return cfg.train


def test_warmup_ratio_gives_one_lr_shape_for_any_length():
  t = _train(warmup_steps=0, warmup_ratio=0.1, lr=1e-3)
  short, long = _lrs(t, 200), _lrs(t, 800)
  np.testing.assert_allclose(short, long, rtol=1e-5, atol=1e-9)
  assert short[0] == 0 and short[2] == pytest.approx(1e-3)  # Peak at 10% of the run.
  steps = _train(warmup_steps=20, lr=1e-3)
  assert not np.allclose(_lrs(steps, 200), _lrs(steps, 800))  # Fixed steps: shapes differ.


def test_warmup_steps_and_ratio_both_set_is_one_line():
  with pytest.raises(ValueError) as e:
    _train(warmup_steps=50, warmup_ratio=0.03)
  assert "\n" not in str(e.value) and "--config.train.warmup_steps=0" in str(e.value)
  with pytest.raises(ValueError, match="warmup_ratio must be in"):
    _train(warmup_steps=0, warmup_ratio=1.5)
