"""The export stage on the tiny pipeline: the merged folder loads in transformers and the
adapter in PEFT, both with our logits; a rerun is a no-op; a kill before the rename leaves no
export and the rerun writes it."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import tiny
from stt_jax import train
from stt_jax.preflight import PreflightError
from stt_jax.stages import export
from stt_jax.workdir import Workdir, read_json
from tests import hf_tiny
from tests.test_peft_io import load_in_peft
from tests.test_pipeline import ROOT, _env, _tree, tiny_model  # pylint: disable=unused-import

ARGS = ("--config.stages=('train','export')", "--config.variants=('zero_shot',)")


def _run(workdir, model, fault=None):
  env = _env()
  if fault:
    env["STT_JAX_FAULT"] = fault
  return subprocess.run(
      [sys.executable, "-m", "stt_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
       f"--config.model.path={model}", *ARGS],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("export_run"))
  proc = _run(workdir, tiny_model)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir


def _our_logits(model_path, workdir, ids):
  cfg = tiny.get_config()
  cfg.model.path = model_path
  model, step = train.load_trained(model_path, Workdir(workdir).run("zero_shot"), cfg)
  assert step == cfg.train.steps
  return np.asarray(model(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)))


def test_exports_load_in_transformers_and_peft_with_our_logits(tiny_model, exported):
  out = Workdir(exported).export("zero_shot")
  files = sorted(os.path.relpath(os.path.join(r, f), out)
                 for r, _, fs in os.walk(out) for f in fs)
  print("exports/zero_shot:", files)
  assert {"export.json", "merged/config.json", "merged/model.safetensors",
          "merged/tokenizer.json", "adapter/adapter_config.json",
          "adapter/adapter_model.safetensors"} <= set(files)
  marker = read_json(os.path.join(out, "export.json"))
  assert marker["step"] == 4 and marker["adapter"] == "adapter"

  ids = np.random.default_rng(0).integers(3, hf_tiny.VOCAB, size=(2, 16)).astype(np.int32)
  ours = _our_logits(tiny_model, exported, ids)
  merged = os.path.join(out, "merged")
  diff = np.abs(hf_tiny.hf_logits(merged, ids) - ours).max()
  print(f"merged (transformers) vs ours: max abs logit diff {diff:.2e}")
  assert diff < 1e-4
  text = "Self-Translate-Train"
  assert (transformers.AutoTokenizer.from_pretrained(merged).encode(text) ==
          transformers.AutoTokenizer.from_pretrained(tiny_model).encode(text))

  peft_model, said = load_in_peft(tiny_model, os.path.join(out, "adapter"))
  assert said == []
  with torch.no_grad():
    got = peft_model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  base_diff = np.abs(hf_tiny.hf_logits(tiny_model, ids) - ours).max()
  diff = np.abs(got - ours).max()
  print(f"adapter (PEFT) vs ours: max abs logit diff {diff:.2e} (base vs ours {base_diff:.2e})")
  assert diff < 1e-4 < base_diff  # Four training steps moved the adapter off zero.


def test_rerun_is_noop_and_a_killed_export_is_redone(tiny_model, exported, tmp_path):
  before = _tree(exported)
  proc = _run(exported, tiny_model)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "zero_shot step 4 already exported; skipping" in proc.stderr
  changed = {k for k, t in _tree(exported).items() if before.get(k) != t} - {
      "config.json", "resources.jsonl"}  # Each run logs its stages' time and memory.
  assert not changed, changed

  wd = Workdir(exported)
  os.rename(wd.export("zero_shot"), str(tmp_path / "first"))
  killed = _run(exported, tiny_model, fault="export.written:1")
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert not os.path.exists(wd.export("zero_shot")) and os.path.isdir(wd.export_tmp("zero_shot"))
  proc = _run(exported, tiny_model)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not os.path.exists(wd.export_tmp("zero_shot"))
  for name in ("merged/model.safetensors", "adapter/adapter_model.safetensors"):
    assert (tmp_path / "first" / name).read_bytes() == \
        open(os.path.join(wd.export("zero_shot"), name), "rb").read()


def test_export_of_an_untrained_variant_is_one_clear_error(tmp_path):
  cfg = tiny.get_config()
  cfg.variants = ("zero_shot",)
  with pytest.raises(PreflightError, match=r"export: variant zero_shot has not finished "
                     r"training \(no .*train_done.json\); run the 'train' stage first"):
    export.run(cfg, Workdir(str(tmp_path)))
