"""Scanned layers (model.scan_layers): stacked layer params under lax.scan give what the
unrolled layers give (logits, a train step's loss and grads with and without remat, full and
LoRA with dropout, greedy tokens, sharded), keep the HF names at the load/save boundary, and a
checkpoint of one layout refuses the other in one line naming model.scan_layers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stt_jax import checkpoint, generation, sharding, train, train_data
from stt_jax.models import hf_io, load_hf, lora, save_hf
from stt_jax.tasks import get_task
from tests import hf_tiny
from tests.test_train_helpers import ByteTokenizer, math_rows, small_config

TOL = 1e-5
TASK = get_task("mgsm")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "qwen2")


@pytest.fixture(scope="module")
def mixed_window(tmp_path_factory):
  """Qwen2 with a full-attention first layer and sliding windows (4) after it: the scan must
  pick each layer's own mask."""
  return hf_tiny.tmp_model(tmp_path_factory, "qwen2", num_hidden_layers=3,
                           use_sliding_window=True, sliding_window=4, max_window_layers=1)


def _both(folder, **kw):
  scanned, config = load_hf(folder, scan_layers=True, **kw)
  unrolled, _ = load_hf(folder, scan_layers=False, **kw)
  return scanned, unrolled, config


def _stack_layers(tree):
  """An unrolled pure-dict tree (layers {0: ..., 1: ...}) in the stacked layout."""
  tree = dict(tree)
  model = dict(tree["model"])
  rows = model["layers"]
  model["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                 *[rows[i] for i in range(len(rows))])
  tree["model"] = model
  return tree


def _copy_stacked_into(scanned, unrolled, kind=nnx.Param):
  """Sets every `kind` variable of the unrolled model to the scanned one's (row i of a stacked
  parameter -> layer i)."""
  src = dict(nnx.to_flat_state(nnx.state(scanned, kind)))
  for keys, var in nnx.to_flat_state(nnx.state(unrolled, kind)):
    if keys[:2] == ("model", "layers"):
      var.set_value(src[keys[:2] + keys[3:]].get_value()[keys[2]])
    else:
      var.set_value(src[keys].get_value())


def _assert_trees_close(got, want, rtol=TOL, atol=1e-6):
  flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  flat_g = jax.tree_util.tree_flatten_with_path(got)[0]
  assert len(flat_g) == len(flat_w)
  for path, g in flat_g:
    np.testing.assert_allclose(np.asarray(g), np.asarray(flat_w[path]), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_stacked_tree_and_axes(folder):
  scanned, unrolled, config = _both(folder)
  n = config.num_hidden_layers
  kernel = scanned.model.layers.self_attn.q_proj.kernel
  assert kernel.get_value().shape == (n,) + unrolled.model.layers[0].self_attn.q_proj.kernel.get_value().shape
  assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
  assert scanned.model.layers.input_layernorm.weight.get_metadata()["logical_axes"] == (
      "layers", "norm")
  # Same parameters, rows of the stacked ones = the unrolled layers.
  _assert_trees_close(nnx.to_pure_dict(nnx.state(scanned, nnx.Param)),
                      _stack_layers(nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))),
                      rtol=0, atol=0)
  assert isinstance(unrolled.model.layers, nnx.List)  # Unrolled keeps today's tree.
  for layout in ("train", "inference"):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = sharding.named_sharding(mesh, ("layers", "embed", "heads"), (n, 64, 64), layout).spec
    assert spec[0] is None


@pytest.mark.parametrize("kind", ["llama_gqa", "mistral_window", "mixed_window"])
@pytest.mark.parametrize("pad_left", [True, False])
def test_logits_scanned_equal_unrolled(kind, pad_left, tmp_path_factory, mixed_window):
  folder = mixed_window if kind == "mixed_window" else hf_tiny.tmp_model(tmp_path_factory, kind)
  scanned, unrolled, config = _both(folder)
  if kind == "mixed_window":
    assert config.sliding_windows == (None, 4, 4)
  ids, mask = hf_tiny.random_batch(np.random.default_rng(3), [19, 7, 12], pad_left)
  got = np.asarray(scanned(jnp.asarray(ids), jnp.asarray(mask)))
  want = np.asarray(unrolled(jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)
  if kind != "mixed_window":  # transformers agrees too (test_model_parity covers more).
    np.testing.assert_allclose(got[real], hf_tiny.hf_logits(folder, ids, mask)[real],
                               atol=1e-4, rtol=0)


def _batch(rows=4, seq_len=48):
  examples = train_data.tokenize(TASK, {"en": math_rows(rows)}, ByteTokenizer(), seq_len)
  batch = train_data.BatchIterator(examples, batch_size=rows, seq_len=seq_len, packing=True,
                                   weights={}, seed=0).next()
  return {k: jnp.asarray(v.reshape(1, -1, v.shape[-1])) for k, v in batch.arrays().items()}


def _loss_and_grads(model, method):
  graphdef, params, frozen = train.split_trainable(model, method)
  fn = jax.jit(functools.partial(train.loss_and_grads, graphdef=graphdef))
  loss, _, grads = fn(nnx.to_pure_dict(params), nnx.to_pure_dict(frozen), _batch(),
                      jnp.asarray([7, 11], jnp.uint32))
  return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("remat", [False, True])
def test_full_train_step_loss_and_grads_equal(mixed_window, remat):
  scanned, unrolled, _ = _both(mixed_window)
  scanned.remat = unrolled.remat = remat
  loss_s, grads_s = _loss_and_grads(scanned, "full")
  loss_u, grads_u = _loss_and_grads(unrolled, "full")
  assert abs(loss_s - loss_u) <= 1e-6 * abs(loss_u), (loss_s, loss_u)
  _assert_trees_close(grads_s, _stack_layers(grads_u))


def test_lora_train_step_with_dropout_equal(folder):
  """Same adapters, dropout on: equal loss and grads need the same dropout masks, i.e. the
  (layer, projection) fold-in of the stacked adapters inside the scan matches the unrolled."""
  scanned, unrolled, config = _both(folder)
  kw = dict(rank=4, alpha=8.0, dropout=0.3, targets="all", seed=5)
  lora.apply_lora(scanned, **kw)
  lora.apply_lora(unrolled, **kw)
  a = scanned.model.layers.self_attn.q_proj.lora_a.get_value()
  assert a.shape == (config.num_hidden_layers, 64, 4)
  assert scanned.model.layers.mlp.down_proj.lora_b.get_value().shape == (
      config.num_hidden_layers, 4, 64)
  assert not np.allclose(a[0], a[1])  # Each layer's adapter drawn independently.
  rng = np.random.default_rng(0)
  for _, var in nnx.to_flat_state(nnx.state(scanned, nnx.LoRAParam)):
    var.set_value(jnp.asarray(0.05 * rng.standard_normal(var.get_value().shape), jnp.float32))
  _copy_stacked_into(scanned, unrolled, nnx.LoRAParam)
  for m in (scanned, unrolled):
    m.train()
  loss_s, grads_s = _loss_and_grads(scanned, "lora")
  loss_u, grads_u = _loss_and_grads(unrolled, "lora")
  assert abs(loss_s - loss_u) <= 1e-6 * abs(loss_u), (loss_s, loss_u)
  _assert_trees_close(grads_s, _stack_layers(grads_u))
  # Dropout really is on (else the check above says nothing about the masks).
  for m in (scanned, unrolled):
    m.eval()
  assert abs(_loss_and_grads(scanned, "lora")[0] - loss_s) > 1e-4
  # Merge/export of stacked adapters equals the adapted model.
  ids, mask = hf_tiny.random_batch(np.random.default_rng(4), [9, 5], True)
  want = np.asarray(scanned(jnp.asarray(ids), jnp.asarray(mask)))
  merged = lora.merge(scanned)
  np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids), jnp.asarray(mask))), want,
                             atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2", "mixed_window"])
def test_greedy_tokens_equal(kind, folder, mixed_window):
  scanned, unrolled, _ = _both(folder if kind == "qwen2" else mixed_window)
  rng = np.random.default_rng(5)
  common = [int(t) for t in rng.integers(3, 256, 9)]  # Shared prefix path too.
  prompts = [common + [int(t) for t in rng.integers(3, 256, n)] for n in (3, 8, 1)]
  prompts.append([int(t) for t in rng.integers(3, 256, 6)])
  got = generation.generate_tokens(scanned, prompts, max_new_tokens=12, eos_ids=[], batch_size=4)
  want = generation.generate_tokens(unrolled, prompts, max_new_tokens=12, eos_ids=[],
                                batch_size=4)
  assert got == want
  assert all(len(t) == 12 for t in got)


def test_save_hf_from_scanned_reloads_in_transformers(folder, tmp_path):
  scanned, _ = load_hf(folder)
  out = save_hf(scanned, scanned.config, tmp_path / "out", max_shard_bytes=60_000)
  src, dst = {}, {}
  for d, names in ((folder, src), (out, dst)):
    files = hf_io._WeightFiles(d)  # pylint: disable=protected-access
    for n in files.names():
      names[n] = np.array(files.get(n)[1])  # A copy: the mmap closes below.
    files.close()
  assert sorted(dst) == sorted(src)  # model.layers.{i}.* names, one tensor per layer.
  for n, v in src.items():
    np.testing.assert_array_equal(dst[n], v, err_msg=n)
  ids, mask = hf_tiny.random_batch(np.random.default_rng(6), [10, 4], False)
  ours = np.asarray(scanned(jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(hf_tiny.hf_logits(out, ids, mask)[real], ours[real], atol=1e-4,
                             rtol=0)


@pytest.mark.parametrize("layout", ["train", "inference"])
def test_sharded_scanned_equals_unsharded_unrolled(mixed_window, layout):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded, config = load_hf(mixed_window, mesh=mesh, layout=layout)
  unrolled, _ = load_hf(mixed_window, scan_layers=False)
  kernel = sharded.model.layers.mlp.up_proj.kernel.get_value()
  spec = kernel.sharding.spec
  assert spec[0] is None and spec[2] == "tensor"
  assert spec[1] == ("fsdp" if layout == "train" else None)
  # Each device read only its shard: every layer's rows, its slice of the other dims.
  shard = kernel.addressable_shards[0].data
  assert shard.shape[0] == config.num_hidden_layers
  np.testing.assert_array_equal(
      np.asarray(shard), np.asarray(
          jnp.stack([l.mlp.up_proj.kernel.get_value() for l in unrolled.model.layers])
      )[kernel.addressable_shards[0].index])
  ids, mask = hf_tiny.random_batch(np.random.default_rng(7), [9, 16, 5, 12], True)
  batch = sharding.named_sharding(mesh, ("batch", None), ids.shape)
  got = nnx.jit(lambda m, i, k: m(i, k))(sharded, jax.device_put(jnp.asarray(ids), batch),
                                         jax.device_put(jnp.asarray(mask), batch))
  want = np.asarray(unrolled(jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-5, rtol=0)
  prompts = [[int(t) for t in np.random.default_rng(8).integers(3, 256, n)] for n in (5, 11)]
  assert (generation.generate_tokens(sharded, prompts, max_new_tokens=8, eos_ids=[], mesh=mesh)
          == generation.generate_tokens(unrolled, prompts, max_new_tokens=8, eos_ids=[]))


def test_checkpoint_of_other_layout_fails_naming_scan_layers(folder, tmp_path):
  config = small_config(steps=2, batch_size=4)
  config.checkpoint.every = 2
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  rows = {"en": math_rows(8)}
  result = train.train(folder, ByteTokenizer(), TASK, rows, config, tmp_path / "run", mesh)
  assert result.step == 2 and result.model.scan_layers
  loaded, step = train.load_trained(folder, tmp_path / "run", config, mesh)
  assert step == 2 and loaded.scan_layers
  config.model.scan_layers = False
  with pytest.raises(checkpoint.CheckpointMismatchError, match="model.scan_layers") as e:
    train.load_trained(folder, tmp_path / "run", config, mesh)
  assert "\n" not in str(e.value)
  config.train.steps = 4  # Resuming the run in the other layout fails the same way.
  with pytest.raises(checkpoint.CheckpointMismatchError, match="model.scan_layers") as e:
    train.train(folder, ByteTokenizer(), TASK, rows, config, tmp_path / "run", mesh)
  assert "\n" not in str(e.value)
  ckpts = checkpoint.Checkpoints(tmp_path / "run" / "checkpoints", read_only=True)
  assert ckpts.steps() == [2]  # Nothing moved or quarantined.
  ckpts.close()
