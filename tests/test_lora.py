"""LoRA: starts at the base model, merges exactly, exports to transformers, shards, and trains
only the adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stt_jax import sharding, train
from stt_jax.models import load_hf, lora, save_hf
from stt_jax.tasks import get_task
from tests import hf_tiny
from tests.test_train_helpers import ByteTokenizer, math_rows, small_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "llama_gqa")


def _ids():
  return hf_tiny.random_batch(np.random.default_rng(0), [12, 7, 12], pad_left=False)


def _randomise_adapters(model, seed=1):
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    value = var.get_value()
    var.set_value(jnp.asarray(0.05 * rng.standard_normal(value.shape), value.dtype))


def test_lora_starts_at_base_and_merges_exactly(folder):
  ids, mask = _ids()
  base, _ = load_hf(folder)
  want = np.asarray(base(jnp.asarray(ids), jnp.asarray(mask)))
  model, _ = load_hf(folder)
  lora.apply_lora(model, rank=4, alpha=8.0, dropout=0.1, targets="q_proj,v_proj,down_proj")
  adapted = [m for _, m in nnx.iter_modules(model) if isinstance(m, lora.LoRALinear)]
  # Three projections, each stacked over the two layers (scanned layout).
  assert len(adapted) == 3
  assert all(m.lora_a.get_value().shape[0] == m.lora_b.get_value().shape[0] == 2
             for m in adapted)
  model.train()  # Dropout on: still the base model while lora_b is zero.
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), want,
                             atol=1e-6, rtol=0)
  model.eval()
  _randomise_adapters(model)
  unmerged = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert np.abs(unmerged - want).max() > 1e-2, "adapters change the output"
  merged = lora.merge(model)
  assert not lora.has_lora(merged) and lora.has_lora(model)
  np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids), jnp.asarray(mask))), unmerged,
                             atol=2e-5, rtol=0)


def test_merge_in_float32_then_cast():
  base = nnx.Linear(8, 16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  holder = nnx.Dict(q_proj=base)
  lora.apply_lora(holder, rank=2, alpha=4.0, targets="q_proj")
  _randomise_adapters(holder, seed=3)
  layer = holder["q_proj"]
  assert layer.lora_a.get_value().dtype == jnp.float32  # Adapters train in param_dtype.
  merged = lora.merge(holder)["q_proj"].kernel.get_value()
  a, b = np.asarray(layer.lora_a.get_value()), np.asarray(layer.lora_b.get_value())
  want = (np.asarray(base.kernel.get_value(), np.float32) + 2.0 * a @ b).astype(jnp.bfloat16)
  assert merged.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(merged), want)


def test_lora_params_are_sharded_and_alone_in_the_optimizer(folder):
  config = small_config(method="lora", **{"lora.rank": 4})
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = train._prepare_model(folder, config.train, mesh)
  trainer = train.Trainer(model, config.train, mesh, total_steps=4)
  state = trainer.init_state()
  names = {".".join(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
  assert len(names) == 2 * 7  # a, b x seven projections, each stacked over the two layers.
  assert all(x.shape[0] == 2 for x in jax.tree.leaves(state.params))
  adam = state.opt_state[1][0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state.params)
  q = state.params["model"]["layers"]["self_attn"]["q_proj"]
  P = jax.sharding.PartitionSpec
  assert q["lora_a"].sharding.spec == P(None, "fsdp", None)  # [layers, embed, r]
  assert q["lora_b"].sharding.spec == P(None, None, "tensor")  # [layers, r, heads]
  assert adam.mu["model"]["layers"]["self_attn"]["q_proj"]["lora_b"].sharding == \
      q["lora_b"].sharding


def test_lora_training_changes_only_adapters_and_exports(folder, tmp_path):
  config = small_config(method="lora", steps=10, lr=1e-2, **{"lora.rank": 4,
                                                            "lora.dropout": 0.1})
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  result = train.train(folder, ByteTokenizer(), get_task("mgsm"), {"en": math_rows(16)},
                       config, tmp_path / "run", mesh)
  base, _ = load_hf(folder)
  trained = result.model
  np.testing.assert_array_equal(
      np.asarray(trained.model.layers.self_attn.q_proj.base_module.kernel.get_value()),
      np.asarray(base.model.layers.self_attn.q_proj.kernel.get_value()))  # Every layer's.
  lora_b = np.asarray(trained.model.layers.mlp.up_proj.lora_b.get_value())
  assert all(np.abs(row).max() > 0 for row in lora_b)  # Each layer's adapter trained.
  assert trained.model.layers.mlp.up_proj.dropout.deterministic  # Returned in eval mode.
  ids, mask = _ids()
  ours = np.asarray(trained(jnp.asarray(ids), jnp.asarray(mask)))
  out = save_hf(trained, base.config, tmp_path / "export")
  np.testing.assert_allclose(hf_tiny.hf_logits(out, ids, mask), ours, atol=1e-4, rtol=0)
  # The checkpoint loads back as trained (adapters kept) for evaluation, or merged.
  loaded, step = train.load_trained(folder, tmp_path / "run", config, mesh)
  assert step == 10 and lora.has_lora(loaded)
  np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask))), ours)
  merged, step = train.load_trained(folder, tmp_path / "run", config, mesh, merge=True)
  assert step == 10 and not lora.has_lora(merged)
  np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids), jnp.asarray(mask))), ours,
                             atol=2e-5, rtol=0)


def test_eval_scores_the_trained_bf16_lora_model_not_a_bf16_merge(folder, tmp_path):
  """bf16 compute, float32 adapters: the model eval loads gives the trainer's own logits (bit
  for bit); folding the adapters into the bf16 kernels would not."""
  config = small_config(method="lora", steps=3, lr=1e-3, dtype="bfloat16",
                        **{"lora.rank": 4})
  mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
  result = train.train(folder, ByteTokenizer(), get_task("mgsm"), {"en": math_rows(16)},
                       config, tmp_path / "run", mesh)
  ids, mask = _ids()
  ours = np.asarray(result.model(jnp.asarray(ids), jnp.asarray(mask)))
  loaded, step = train.load_trained(folder, tmp_path / "run", config, mesh=mesh)  # As eval.
  assert step == 3 and lora.has_lora(loaded)
  np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask))), ours)
  merged = lora.merge(result.model)  # What eval scored before: adapters rounded into bf16.
  assert np.abs(np.asarray(merged(jnp.asarray(ids), jnp.asarray(mask))) - ours).max() > 0
