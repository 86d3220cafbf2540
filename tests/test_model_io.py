"""Export round trip, dtype handling, and clear errors for bad model folders."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from stt_jax.models import ConfigError, LoadError, ModelConfig, load_hf, save_hf
from stt_jax.models import safetensors_io
from tests import hf_tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "llama_gqa")


def _batch():
  return hf_tiny.random_batch(np.random.default_rng(3), [10, 6], pad_left=True)


@pytest.mark.parametrize("kind", ["llama_head_dim_tied", "qwen2", "llama_bias", "gemma2",
                                  "gemma3"])
def test_save_hf_round_trip(kind, tmp_path):
  src = hf_tiny.make_tiny(kind, str(tmp_path / "src"))
  # A tokenizer file to be carried along.
  with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 256}, f)
  model, config = load_hf(src)
  out = save_hf(model, config, tmp_path / "out", max_shard_bytes=40_000)
  files = sorted(os.listdir(out))
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  assert "tokenizer_config.json" in files
  ids, mask = _batch()
  original = hf_tiny.hf_logits(src, ids, mask)
  reloaded = hf_tiny.hf_logits(out, ids, mask)
  np.testing.assert_allclose(reloaded, original, atol=1e-6, rtol=0)


def test_bf16_checkpoint_cast_on_load(tmp_path):
  folder = hf_tiny.make_tiny("llama_gqa", str(tmp_path / "bf16"), dtype=torch.bfloat16)
  assert json.load(open(os.path.join(folder, "config.json"))).get("dtype") == "bfloat16"
  model, config = load_hf(folder, dtype="float32")
  assert model.model.embed_tokens.embedding.get_value().dtype == jnp.float32
  ids, mask = _batch()
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(got[mask.astype(bool)],
                             hf_tiny.hf_logits(folder, ids, mask)[mask.astype(bool)], atol=1e-4)
  bf16, _ = load_hf(folder, dtype="bfloat16")
  assert bf16.model.layers.mlp.up_proj.kernel.get_value()[0].dtype == jnp.bfloat16  # Row 0.
  got16 = np.asarray(bf16(jnp.asarray(ids), jnp.asarray(mask)))
  assert got16.dtype == np.float32 and np.abs(got16 - got)[mask.astype(bool)].max() < 0.1
  # Saving bf16 params writes a bf16 checkpoint transformers reads.
  out = save_hf(bf16, config, tmp_path / "o")
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  with safetensors_io.SafetensorsFile(os.path.join(out, "model.safetensors")) as f:
    assert f.dtype("model.norm.weight") == np.dtype(jnp.bfloat16)
  # Same bf16 weights as the source checkpoint, bit for bit.
  np.testing.assert_array_equal(hf_tiny.hf_logits(out, ids, mask),
                                hf_tiny.hf_logits(folder, ids, mask))


def test_config_reads_old_and_v5_keys():
  base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8,
              intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
  old = ModelConfig.from_hf_dict({**base, "rope_theta": 5e5, "torch_dtype": "bfloat16",
                                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                   "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192}})
  new = ModelConfig.from_hf_dict({**base, "dtype": "bfloat16",
                                  "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                                      "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}})
  assert old == new
  assert old.rope_theta == 5e5 and old.rope_type == "llama3" and old.checkpoint_dtype == "bfloat16"
  assert old.num_key_value_heads == 2 and old.head_dim == 4


def _edit_config(folder, **changes):
  path = os.path.join(folder, "config.json")
  cfg = json.load(open(path))
  cfg.update(changes)
  json.dump(cfg, open(path, "w"))


def test_unknown_architecture(llama, tmp_path):
  bad = shutil.copytree(llama, tmp_path / "m")
  _edit_config(bad, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(ConfigError, match=r"unsupported architecture \['GPT2LMHeadModel'\].*"
                     r"supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
    load_hf(bad)


def test_unknown_rope_type(llama, tmp_path):
  bad = shutil.copytree(llama, tmp_path / "m")
  _edit_config(bad, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
  with pytest.raises(ConfigError, match=r"unsupported rope type 'yarn' \(key "
                     r"'rope_parameters.rope_type'\); supported: default, llama3"):
    load_hf(bad)


def _tensors(folder) -> dict:
  with safetensors_io.SafetensorsFile(os.path.join(folder, "model.safetensors")) as f:
    return {n: np.array(f.tensor(n)) for n in f.keys()}


def _folder_with(llama, bad, tensors: dict):
  """A copy of `llama`'s config.json with the given tensors as its weights."""
  bad.mkdir(exist_ok=True)
  shutil.copy(os.path.join(llama, "config.json"), bad)
  safetensors_io.write(str(bad / "model.safetensors"), tensors.items())
  return bad


def test_missing_tensor(llama, tmp_path):
  tensors = _tensors(llama)
  del tensors["model.layers.1.mlp.down_proj.weight"]
  bad = _folder_with(llama, tmp_path / "m", tensors)
  with pytest.raises(LoadError, match=r"missing 1 tensor\(s\).*model\.layers\.1\.mlp\.down_proj"):
    load_hf(bad)


def test_wrong_shape_and_unexpected(llama, tmp_path):
  tensors = _tensors(llama)
  tensors["model.norm.weight"] = np.ones(65, np.float32)
  bad = _folder_with(llama, tmp_path / "m", tensors)
  with pytest.raises(LoadError, match=r"'model\.norm\.weight' has shape \(65,\), config implies "
                     r"\(64,\)"):
    load_hf(bad)
  tensors["model.norm.weight"] = np.ones(64, np.float32)
  tensors["model.layers.0.extra.weight"] = np.ones(3, np.float32)
  _folder_with(llama, bad, tensors)
  with pytest.raises(LoadError, match=r"unexpected tensor\(s\) model\.layers\.0\.extra\.weight"):
    load_hf(bad)


def test_empty_and_missing_folder(tmp_path):
  with pytest.raises(LoadError, match="model folder not found"):
    load_hf(tmp_path / "nope")
  with pytest.raises(ConfigError, match=r"config\.json: not found"):
    load_hf(tmp_path)


def test_pickle_only_folder_is_refused(llama, tmp_path):
  bad = tmp_path / "m"
  bad.mkdir()
  shutil.copy(os.path.join(llama, "config.json"), bad)
  (bad / "pytorch_model.bin").write_bytes(b"not unpickled")
  with pytest.raises(LoadError, match=r"only pickle weights \(pytorch_model\.bin\).*never "
                     r"unpickled.*safe_serialization=True"):
    load_hf(bad)


def test_corrupt_safetensors_header(llama, tmp_path):
  bad = shutil.copytree(llama, tmp_path / "m")
  path = os.path.join(bad, "model.safetensors")
  data = bytearray(open(path, "rb").read())
  data[8:20] = b"\x00garbage!!!!"
  open(path, "wb").write(bytes(data))
  with pytest.raises(safetensors_io.SafetensorsError, match="corrupt safetensors header"):
    load_hf(bad)
  open(path, "wb").write(bytes(data[:4]))
  with pytest.raises(safetensors_io.SafetensorsError, match="truncated"):
    load_hf(bad)
