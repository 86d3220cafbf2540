"""Gemma 2 / Gemma 3 (text) as switches of the one decoder: both config.json key forms, the
config written back, the soft-cap attention rule, scanned == unrolled == sharded, LoRA, and
loss gradients equal transformers'. Logit parity, greedy decoding, the engine and the save
round trip are the shared parametrised tests (test_model_parity, test_decode, test_engine,
test_model_io)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from stt_jax import memory_plan, preflight, run_config, sharding
from stt_jax.models import ConfigError, ModelConfig, attention, hf_io, load_hf, lora
from tests import hf_tiny


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "gemma2")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "gemma3")


def _raw(folder):
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    return json.load(f)


def test_switches_read_from_the_fixtures(gemma2, gemma3):
  c2, c3 = ModelConfig.from_hf(gemma2), ModelConfig.from_hf(gemma3)
  for c in (c2, c3):
    assert c.embed_scale and c.norm_unit_offset and c.sandwich_norms and c.tie_word_embeddings
    assert c.hidden_act == "gelu_pytorch_tanh"
  assert c2.sliding_windows == (4, None, 4, None) and not c2.qk_norm
  assert (c2.attn_logit_softcapping, c2.final_logit_softcapping) == (2.0, 3.0)
  assert c2.attn_scale == pytest.approx(12 ** -0.5) and c2.rope_tables()[0][1] < 1
  assert c3.sliding_windows == (4,) * 5 + (None,) and c3.qk_norm
  assert c3.attn_logit_softcapping is None  # transformers' Gemma 3 does not cap scores.
  assert [c3.rope_index(i) for i in range(6)] == [1] * 5 + [0]
  glob, local = c3.rope_tables()
  np.testing.assert_allclose(glob[1], 1e6 ** (-2 / 16) / 2.0, rtol=1e-6)  # Linear scaling.
  np.testing.assert_allclose(local[1], 1e4 ** (-2 / 16), rtol=1e-6)
  # The extra norms are counted: four per layer plus q/k norms (Gemma 3).
  base = dataclasses.replace(c3, sandwich_norms=False, qk_norm=False)
  assert c3.num_params() - base.num_params() == 6 * (2 * 64 + 2 * 16)


def test_pre_v5_keys_read_as_v5(gemma2, gemma3):
  v5 = _raw(gemma3)
  old = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types",
                                                   "hidden_activation")}
  old.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=6,
             rope_scaling={"type": "linear", "factor": 2.0}, hidden_act="gelu_pytorch_tanh",
             torch_dtype="float32")
  assert ModelConfig.from_hf_dict(old) == dataclasses.replace(
      ModelConfig.from_hf_dict(v5), checkpoint_dtype="float32")
  v5 = _raw(gemma2)
  old = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types")}
  old.update(rope_theta=10000.0, hidden_act="gelu_pytorch_tanh")
  assert ModelConfig.from_hf_dict(old) == ModelConfig.from_hf_dict(v5)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_config_written_without_a_source_dict_reads_back(kind, gemma2, gemma3, tmp_path):
  config = ModelConfig.from_hf(gemma2 if kind == "gemma2" else gemma3)
  out = dataclasses.replace(config, hf_config=None).to_hf_dict(dtype="float32")
  hf = transformers.AutoConfig.for_model(**out)
  assert type(hf).__name__ == ("Gemma2Config" if kind == "gemma2" else "Gemma3TextConfig")
  hf.save_pretrained(tmp_path)
  again = ModelConfig.from_hf(tmp_path)
  assert dataclasses.replace(again, checkpoint_dtype=None) == dataclasses.replace(
      config, checkpoint_dtype=None)


@pytest.mark.parametrize("change, words", [
    (dict(layer_types=["sliding_attention"]), "layer_types"),
    (dict(hidden_activation="relu"), "hidden_activation"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     "rope_parameters.sliding_attention"),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0}}),
     "rope_parameters.full_attention.rope_type"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(final_logit_softcapping="30"), "final_logit_softcapping"),
])
def test_bad_gemma_config_fails_in_one_line(gemma3, change, words):
  with pytest.raises(ConfigError, match=words) as e:
    ModelConfig.from_hf_dict({**_raw(gemma3), **change}, source="g3/config.json")
  assert "\n" not in str(e.value) and "g3/config.json" in str(e.value)


def test_soft_cap_picks_a_capping_kernel(gemma2):
  assert attention.resolve("auto", "bfloat16", 128, "gpu", soft_cap=50.0) == "einsum"
  assert attention.resolve("auto", "float32", 128, "cpu", soft_cap=50.0) == "einsum"
  assert attention.resolve("auto", "bfloat16", 128, "tpu", soft_cap=50.0) == "splash"
  assert attention.resolve("auto", "bfloat16", 128, "gpu") == "cudnn"
  for impl, platform in (("xla", "cpu"), ("cudnn", "gpu")):
    with pytest.raises(attention.AttentionError, match="model.attention") as e:
      attention.resolve(impl, "bfloat16", 128, platform, soft_cap=50.0)
    assert "\n" not in str(e.value) and "soft-cap" in str(e.value)
  with pytest.raises(attention.AttentionError, match="einsum"):
    load_hf(gemma2, attention="xla")
  cfg = run_config.get_config()  # Preflight and the memory plan apply the same rule.
  cfg.model.path, cfg.model.attention = gemma2, "xla"
  with pytest.raises(attention.AttentionError, match="soft-cap"):
    preflight.check_attention(cfg, ("train",))
  with pytest.raises(attention.AttentionError, match="soft-cap"):
    memory_plan.train_attention(cfg, ModelConfig.from_hf(gemma2))
  cfg.model.attention = "auto"
  preflight.check_attention(cfg, ("train", "eval"), platform="gpu")
  assert memory_plan.train_attention(cfg, ModelConfig.from_hf(gemma2)) == "splash"


def test_scanned_unrolled_and_sharded_agree(gemma2, gemma3):
  ids, mask = hf_tiny.random_batch(np.random.default_rng(4), [19, 5, 12, 16], pad_left=True)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  for folder in (gemma2, gemma3):
    ref = np.asarray(load_hf(folder)[0](jnp.asarray(ids), jnp.asarray(mask)))
    unrolled, _ = load_hf(folder, scan_layers=False)
    sharded, _ = load_hf(folder, mesh=mesh)
    real = mask.astype(bool)
    for model in (unrolled, sharded):
      got = np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids),
                                                          jnp.asarray(mask)))
      np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)


def _ce(logits, ids, mask):
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  keep = mask[:, 1:].astype(jnp.float32)
  return (nll * keep).sum() / keep.sum()


def test_lora_on_every_projection_trains(gemma2):
  ids, mask = hf_tiny.random_batch(np.random.default_rng(5), [12, 7], pad_left=False)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  forward = nnx.jit(lambda m: m(ids, mask))
  model, _ = load_hf(gemma2)
  want = np.asarray(forward(model))
  lora.apply_lora(model, rank=4, alpha=8.0, targets=",".join(lora.TARGETS))
  assert sum(isinstance(m, lora.LoRALinear) for _, m in nnx.iter_modules(model)) == 7
  np.testing.assert_allclose(np.asarray(forward(model)), want, atol=1e-6, rtol=0)
  grads = nnx.jit(nnx.grad(lambda m: _ce(m(ids, mask), ids, mask),
                           argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
  flat = nnx.to_flat_state(grads)
  assert len(flat) == 14
  b_grads = [np.asarray(v.get_value()) for k, v in flat if k[-1] == "lora_b"]
  assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in b_grads)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_loss_gradients_match_transformers(kind, gemma2, gemma3):
  """Both soft-caps, the sandwich, q/k and (1 + w) norms differentiate as in torch; Gemma 3
  through the scanned, rematerialised layers with two RoPE tables, Gemma 2 unrolled."""
  folder = gemma2 if kind == "gemma2" else gemma3
  ids, mask = hf_tiny.random_batch(np.random.default_rng(6), [14, 9], pad_left=False)
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         attn_implementation="eager")
  labels = torch.as_tensor(np.where(mask > 0, ids, -100), dtype=torch.long)
  out = hf(input_ids=torch.as_tensor(ids, dtype=torch.long),
           attention_mask=torch.as_tensor(mask, dtype=torch.long), labels=labels)
  out.loss.backward()
  scan = kind == "gemma3"
  model, config = load_hf(folder, scan_layers=scan)
  model.remat = scan
  loss, grads = nnx.value_and_grad(
      lambda m: _ce(m(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(ids),
                    jnp.asarray(mask)))(model)
  assert float(loss) == pytest.approx(out.loss.item(), abs=1e-5)
  worst = 0.0
  for keys, var in nnx.to_flat_state(nnx.state(grads, nnx.Param)):
    names, transpose = hf_io.hf_names(keys, config.num_hidden_layers)
    rows = np.asarray(var.get_value())
    rows = rows if hf_io.is_stacked(keys) else rows[None]
    for name, got in zip(names, rows):
      want = hf.get_parameter(name).grad.numpy()
      got = got.T if transpose else got
      worst = max(worst, np.abs(got - want).max() / np.abs(want).max())
  assert worst < 1e-4, f"max relative gradient difference {worst:.2e}"
