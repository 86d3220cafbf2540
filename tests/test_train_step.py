"""The train step: parity with transformers+torch, sharded == unsharded, accumulation, overfit,
the config errors of the train section (run_config.validate) and the MFU formula."""

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from stt_jax import flops, run_config, sharding, train, train_data
from stt_jax.models import hf_io, load_hf
from stt_jax.models.config import ModelConfig
from stt_jax.tasks import get_task
from tests import hf_tiny
from tests.test_train_helpers import ByteTokenizer, math_rows, read_metrics, small_config

TASK = get_task("mgsm")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "llama_gqa")


def _batch(rows=8, seq_len=64, packing=False, seed=0):
  examples = train_data.tokenize(TASK, {"en": math_rows(rows, seed=seed)}, ByteTokenizer(),
                                 seq_len)
  return train_data.BatchIterator(examples, batch_size=rows, seq_len=seq_len, packing=packing,
                                  weights={}, seed=seed).next()


def _torch_loss_and_grads(folder, batch):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager")
  seg = torch.as_tensor(batch.segment_ids)
  logits = model(input_ids=torch.as_tensor(batch.inputs, dtype=torch.long),
                 attention_mask=(seg > 0).long(),
                 position_ids=torch.as_tensor(batch.positions, dtype=torch.long)).logits
  nll = torch.nn.functional.cross_entropy(
      logits.transpose(1, 2), torch.as_tensor(batch.targets, dtype=torch.long), reduction="none")
  mask = torch.as_tensor(batch.loss_mask, dtype=torch.float32)
  loss = (nll * mask).sum() / mask.sum()
  loss.backward()
  return loss.item(), {n: p.grad.numpy() for n, p in model.named_parameters()}


def _our_loss_and_grads(folder, batch, accum):
  model, _ = load_hf(folder)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  arrays = {k: jnp.asarray(v.reshape(accum, -1, v.shape[-1]))
            for k, v in batch.arrays().items()}
  fn = jax.jit(functools.partial(train.loss_and_grads, graphdef=graphdef))
  loss, _, grads = fn(nnx.to_pure_dict(params), nnx.to_pure_dict(frozen), arrays,
                      jnp.zeros((2,), jnp.uint32))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  return float(loss), {tuple(k.key for k in path): np.asarray(v) for path, v in flat}


def test_loss_and_grads_match_torch(folder):
  batch = _batch()
  ref_loss, ref_grads = _torch_loss_and_grads(folder, batch)
  worst = 0.0
  for accum in (1, 2):  # Accumulating two micro-batches is the same as one batch.
    loss, grads = _our_loss_and_grads(folder, batch, accum)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    rows = {}  # HF name -> (our gradient, transposed?); row i of a stacked parameter.
    for keys, g in grads.items():
      names, transpose = hf_io.hf_names(keys, len(g))
      rows.update((n, (r, transpose))
                  for n, r in zip(names, g if hf_io.is_stacked(keys) else [g]))
    assert len(rows) == len(ref_grads)
    for hf_name, (g, transpose) in rows.items():
      want = ref_grads[hf_name].T if transpose else ref_grads[hf_name]
      rel = np.linalg.norm(g - want) / max(np.linalg.norm(want), 1e-12)
      worst = max(worst, rel)
      assert rel < 1e-4, (hf_name, rel)
  print(f"torch parity: loss {ref_loss:.6f}, worst relative gradient error {worst:.2e}")


def test_sharded_step_equals_unsharded(folder):
  config = small_config(grad_accum=2)
  batch = _batch()
  results = []
  for shape, n in (({"fsdp": 1}, 1), ({"data": 2, "fsdp": 2, "tensor": 2}, 8)):
    mesh = sharding.make_mesh(shape, jax.devices()[:n])
    trainer = train.Trainer(train._prepare_model(folder, config.train, mesh), config.train,
                            mesh, total_steps=8)
    state = trainer.init_state()
    losses = []
    for _ in range(2):
      state, metrics = trainer.step(state, trainer.device_batch(batch))
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(state.params), state))
  (l1, p1, _), (l8, p8, s8) = results
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # Adam's normalised update turns ulp-level gradient differences on near-zero gradients into
  # visible ones, so parameters are compared to 1% of the learning rate.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=0.01 * config.train.lr,
                                                       rtol=0), p8, p1)
  # Parameters and their Adam moments are really split over fsdp x tensor.
  q = s8.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # Stacked layers.
  mu = s8.opt_state[1][0].mu["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert mu.sharding == q.sharding
  assert q.addressable_shards[0].data.size * 4 == q.size


def test_tiny_model_overfits_in_bf16_with_fp32_master_weights(folder, tmp_path, caplog):
  config = small_config(steps=40, lr=1e-2, min_lr_ratio=1.0, batch_size=4, packing=False,
                        log_every=1, dtype="bfloat16", param_dtype="float32")
  config.checkpoint.every = 1000
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  # A model object (not a path): training works on a copy and leaves it intact.
  model, _ = load_hf(folder, mesh=mesh, dtype="bfloat16", param_dtype="float32")
  kernel = model.model.layers.mlp.up_proj.kernel.get_value()  # Stacked: every layer's.
  before = np.asarray(kernel)
  result = train.train(model, ByteTokenizer(), TASK, {"en": math_rows(4)}, config,
                       tmp_path, mesh)
  assert not kernel.is_deleted()
  np.testing.assert_array_equal(np.asarray(kernel), before)
  rows = read_metrics(tmp_path / "train" / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 41))
  first, last = rows[0]["loss"], rows[-1]["loss"]
  assert last < 0.1 * first, (first, last)
  assert result.step == 40 and not result.preempted
  assert result.model.dtype == jnp.bfloat16
  assert {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(result.model, nnx.Param))
          } == {jnp.dtype(jnp.float32)}
  assert rows[5]["tokens_per_s"] > 0 and rows[5]["mfu"] is None  # CPU: peak unknown.
  # Rerunning the finished run returns at once, with its last metrics row.
  again = train.train(model, ByteTokenizer(), TASK, {"en": math_rows(4)}, config, tmp_path,
                      mesh)
  assert again.step == 40 and again.metrics == rows[-1]
  # Resuming over different data works but says the order is no longer the original one.
  config.train.steps = 41
  with caplog.at_level(logging.WARNING):
    train.train(model, ByteTokenizer(), TASK, {"en": math_rows(5)}, config, tmp_path, mesh)
  assert "training data changed since step 40" in caplog.text


def _config_with(**fields):
  """A full run config with `fields` ('train.lora.rank': 8, ...) set in its plain dict, so
  unknown keys and wrong types reach validate (a ConfigDict refuses a str for a float)."""
  tree = run_config.get_config().to_dict()
  for key, value in fields.items():
    *path, last = key.split(".")
    node = tree
    for p in path:
      node = node[p]
    node[last] = value
  return ml_collections.ConfigDict(tree)


@pytest.mark.parametrize("fields,match", [
    ({"train.lr_warmup": 10},
     r"unknown key 'train.lr_warmup'; did you mean 'train.warmup_steps'\?"),
    ({"train.lora.rnak": 8}, r"unknown key 'train.lora.rnak'; did you mean 'train.lora.rank'\?"),
    ({"train.method": "qlora"}, "'train.method' = 'qlora' is not one of full, lora"),
    ({"train.lr": "fast"}, "'train.lr' must be a number"),
    ({"train.lora.targets": "q_proj,qkv"}, "unknown projection"),
    ({"train.batch_size": 6, "train.grad_accum": 4}, "multiple of train.grad_accum"),
])
def test_config_errors(fields, match):
  with pytest.raises(run_config.ConfigKeyError, match=match):
    run_config.validate(_config_with(**fields))


def test_good_train_overrides_pass_and_are_used_as_given():
  config = _config_with(**{"train.lr": 1, "train.steps": 5, "checkpoint.every": 7})
  run_config.validate(config)
  assert config.train.lr == 1 and config.checkpoint.every == 7 and config.train.method == "lora"
  tx, schedule = train.make_optimizer(config.train, total_steps=5)
  assert tx is not None and float(schedule(4)) == 1.0  # Peak: the warmup is capped at 4.


def test_mfu_formula_and_peak_table():
  cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=1000, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
  n = cfg.num_params() - 1000 * 64
  attn = 4 * 2 * 64 * 128
  assert flops.flops_per_token(cfg, 128, "full") == 6 * n + 3 * attn
  assert flops.flops_per_token(cfg, 128, "lora") == 4 * n + 2 * attn
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("cpu") is None
  assert flops.peak_flops("cpu", configured=1e12) == 1e12
  assert flops.mfu(1e9, 100.0, 1e12, 4) == 1e9 * 100.0 / 4e12
  assert flops.mfu(1e9, 100.0, None, 4) is None  # CPU: peak unknown.
