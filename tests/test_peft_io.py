"""PEFT adapter folders: ours load in HF PEFT with no key warnings and give our logits; PEFT's
load onto our model and give PEFT's logits; anything that does not map exactly is refused."""

import json
import logging
import os
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from stt_jax import run_config, sharding, train
from stt_jax.models import load_hf, lora, peft_io, safetensors_io
from tests import hf_tiny

TOL = 1e-4  # fp32, as the logit parity tests.


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "qwen2")  # q/k/v biases: LoRA leaves them alone.


def _ids():
  return np.random.default_rng(0).integers(3, hf_tiny.VOCAB, size=(2, 12)).astype(np.int32)


def _ours(model, ids):
  return np.asarray(model(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)))


def _torch_base(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager").eval()


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def _adapted(folder, scan_layers, seed=1):
  """Our model with adapters on three projections, A and B random (B nonzero: they matter)."""
  model, config = load_hf(folder, scan_layers=scan_layers)
  lora.apply_lora(model, rank=4, alpha=8.0, targets="q_proj,v_proj,down_proj")
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    value = var.get_value()
    var.set_value(jnp.asarray(0.1 * rng.standard_normal(value.shape), value.dtype))
  return model, config


class _Logged(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.records = []

  def emit(self, record):
    self.records.append(record.getMessage())


def load_in_peft(folder, adapter_dir):
  """(PeftModel over the HF model in `folder`, the warnings and warning logs of loading it).
  Deprecations of transformers APIs that PEFT itself calls are not about the adapter."""
  from peft import PeftModel  # pylint: disable=g-import-not-at-top
  base = _torch_base(folder)
  handler = _Logged()
  loggers = [logging.getLogger(n) for n in ("peft", "transformers", "")]
  for lg in loggers:
    lg.addHandler(handler)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      model = PeftModel.from_pretrained(base, os.fspath(adapter_dir)).eval()
  finally:
    for lg in loggers:
      lg.removeHandler(handler)
  said = [str(w.message) for w in caught
          if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
  return model, said + handler.records


def test_our_adapter_loads_in_peft_with_our_logits(folder, tmp_path):
  from peft import get_peft_model_state_dict  # pylint: disable=g-import-not-at-top
  model, config = _adapted(folder, scan_layers=True)
  ids = _ids()
  ours = _ours(model, ids)
  out = peft_io.save_peft(model, config, tmp_path / "adapter")
  saved = json.loads((tmp_path / "adapter" / peft_io.CONFIG_FILE).read_text())
  assert saved["base_model_name_or_path"] == config.source_dir
  assert np.abs(_torch_logits(_torch_base(folder), ids) - ours).max() > 1e-2, "adapter matters"

  peft_model, said = load_in_peft(folder, out)
  assert said == []

  state = get_peft_model_state_dict(peft_model)
  with safetensors_io.SafetensorsFile(os.path.join(out, peft_io.WEIGHTS_FILE)) as f:
    assert set(state) == set(f.keys())  # Every saved key went into a PEFT module, none is left.
    assert all(k.startswith("base_model.model.model.layers.") for k in f.keys())
    for key in f.keys():
      np.testing.assert_array_equal(state[key].numpy(), f.tensor(key))
  diff = np.abs(_torch_logits(peft_model, ids) - ours).max()
  print(f"ours -> PEFT: max abs logit diff {diff:.2e}")
  assert diff < TOL

  # The trap the prefix avoids, seen by the same capture: PEFT warns and ignores the adapter.
  bare = _rewrite(out, tmp_path / "bare", rename=lambda k: k.removeprefix(peft_io.PREFIX))
  ignored, said = load_in_peft(folder, bare)
  assert any("missing adapter keys" in m for m in said), said
  assert np.abs(_torch_logits(ignored, ids) - ours).max() > 1e-2


def test_peft_adapter_loads_onto_ours_with_peft_logits(folder, tmp_path):
  from peft import LoraConfig, get_peft_model  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  peft_model = get_peft_model(_torch_base(folder), LoraConfig(
      r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["k_proj", "o_proj", "up_proj"],
      task_type="CAUSAL_LM"))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.copy_(0.1 * torch.randn_like(p))
  peft_model.eval()
  ids = _ids()
  want = _torch_logits(peft_model, ids)
  peft_model.save_pretrained(tmp_path / "adapter")

  model, _ = load_hf(folder, scan_layers=False)
  base = _ours(model, ids)
  peft_io.load_peft(model, tmp_path / "adapter")
  layers = [m for _, m in lora.adapters(model)]
  assert len(layers) == 3 * 2 and {m.scale for m in layers} == {4.0}
  assert {m.dropout.rate for m in layers} == {0.1}
  got = _ours(model, ids)
  assert np.abs(base - want).max() > 1e-2, "the adapter matters"
  diff = np.abs(got - want).max()
  print(f"PEFT -> ours: max abs logit diff {diff:.2e}")
  assert diff < TOL
  # What training starts from with train.lora.init_adapter (train.lora's own r is replaced).
  cfg = run_config.get_config()
  cfg.train.method, cfg.train.lora.rank, cfg.train.dtype = "lora", 16, "float32"
  cfg.train.lora.init_adapter = str(tmp_path / "adapter")
  run_config.validate(cfg)
  start = train._prepare_model(folder, cfg.train, sharding.make_mesh(), scan=True)
  np.testing.assert_allclose(_ours(start, ids), want, atol=TOL, rtol=0)
  cfg.train.lora.init_adapter = str(tmp_path)
  with pytest.raises(run_config.ConfigKeyError, match="has no adapter_config.json"):
    run_config.validate(cfg)


def test_scanned_and_unrolled_write_and_read_the_same_adapter(folder, tmp_path):
  """The one place both layouts meet: a stacked adapter is one PEFT pair per layer."""
  scanned, config = _adapted(folder, scan_layers=True)
  peft_io.save_peft(scanned, config, tmp_path / "a")
  unrolled, _ = load_hf(folder, scan_layers=False)
  peft_io.load_peft(unrolled, tmp_path / "a")
  ids = _ids()
  np.testing.assert_allclose(_ours(unrolled, ids), _ours(scanned, ids), atol=TOL, rtol=0)
  peft_io.save_peft(unrolled, config, tmp_path / "b")
  for name in (peft_io.WEIGHTS_FILE, peft_io.CONFIG_FILE):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.fixture(scope="module")
def saved(folder, tmp_path_factory):
  """An adapter of ours (scanned) to spoil one way per test."""
  model, config = _adapted(folder, scan_layers=True)
  return peft_io.save_peft(model, config, tmp_path_factory.mktemp("saved") / "adapter")


def _rewrite(src, dst, rename=None, drop=None, config=None):
  shutil.copytree(src, dst)
  weights = os.path.join(dst, peft_io.WEIGHTS_FILE)
  with safetensors_io.SafetensorsFile(os.path.join(src, peft_io.WEIGHTS_FILE)) as f:
    tensors = [((rename or (lambda k: k))(k), np.array(f.tensor(k))) for k in f.keys()
               if not (drop and drop(k))]
  safetensors_io.write(weights, tensors)
  if config:
    path = os.path.join(dst, peft_io.CONFIG_FILE)
    with open(path) as f:
      raw = json.load(f)
    raw.update(config)
    with open(path, "w") as f:
      json.dump(raw, f)
  return dst


LAYER1_DOWN = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


@pytest.mark.parametrize("spoil,file,message", [
    (dict(rename=lambda k: k.removeprefix(peft_io.PREFIX)), peft_io.WEIGHTS_FILE,
     "key 'model.layers.0.mlp.down_proj.lora_A.weight' lacks the 'base_model.model.' prefix"),
    (dict(drop=lambda k: k == LAYER1_DOWN), peft_io.WEIGHTS_FILE,
     f"key '{LAYER1_DOWN}' is missing (1 of 12 expected)"),
    (dict(config={"r": 8}), peft_io.WEIGHTS_FILE,
     "key 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight' has shape [4, 96], "
     "this model needs [8, 96]"),
    (dict(config={"target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]}),
     peft_io.CONFIG_FILE, "target_modules adapts 'lm_head'; stt_jax LoRA adapts only"),
    (dict(config={"target_modules": ["q_proj", "v_proj", "down_proj", "c_attn"]}),
     peft_io.CONFIG_FILE, "target_modules names 'c_attn', which this model does not have"),
    (dict(config={"target_modules": ["q_proj", "v_proj"]}), peft_io.WEIGHTS_FILE,
     "key 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight' is for a module "
     "adapter_config.json does not target"),
    (dict(config={"use_rslora": True}), peft_io.CONFIG_FILE,
     "use_rslora=true is not plain LoRA, the only kind stt_jax implements; rsLoRA scales"),
    (dict(config={"use_dora": True}), peft_io.CONFIG_FILE, "use_dora=true is not plain LoRA"),
    (dict(config={"init_lora_weights": "pissa"}), peft_io.CONFIG_FILE,
     'init_lora_weights="pissa" is not plain LoRA'),
    (dict(config={"layers_to_transform": [0]}), peft_io.CONFIG_FILE,
     "layers_to_transform=[0] is not plain LoRA"),
    (dict(config={"peft_type": "IA3"}), peft_io.CONFIG_FILE, "peft_type='IA3'; only LoRA"),
], ids=["no_prefix", "missing_layer", "wrong_rank", "lm_head", "unknown_module", "untargeted",
        "rslora", "dora", "pissa", "layers_to_transform", "ia3"])
def test_load_refuses_what_does_not_map(folder, saved, tmp_path, spoil, file, message):
  bad = _rewrite(saved, tmp_path / "bad", **spoil)
  model, _ = load_hf(folder, scan_layers=True)
  with pytest.raises(peft_io.AdapterError) as e:
    peft_io.load_peft(model, bad)
  text = str(e.value)
  assert "\n" not in text and text.startswith(os.path.join(str(bad), file)), text
  assert message in text, text
  assert not lora.has_lora(model)  # Refused before anything changed.
