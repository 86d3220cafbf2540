"""Attention kernels (model.attention): xla and splash (Pallas interpret mode on CPU) give the
dense einsum reference's logits, loss and gradients for every real token, with left and right
padding, packed rows (segment ids), GQA and per-layer sliding windows, scanned and unrolled,
with and without remat, and sharded on the 8-device mesh; `auto` picks per platform and an
impossible request is one line naming model.attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stt_jax import run_config, sharding, train
from stt_jax.models import attention, load_hf
from stt_jax.models.config import ModelConfig
from stt_jax.models.decoder import CausalLM
from tests import hf_tiny

L = 12
# GQA (4 heads over 2 KV heads); layer 0 full attention, layer 1 a window of 3.
CONFIG = ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=64, hidden_size=32,
                     intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, qkv_bias=True,
                     sliding_windows=(None, 3))


def _batch():
  """Row 0 left padded (4 pads), row 1 right padded (3 pads), row 2 packed: segments 1, 2, 3
  and 2 pads (segment 0), positions restarting per segment; row 3 unpadded."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 64, size=(4, L)).astype(np.int32)
  mask = np.ones((4, L), bool)
  mask[0, :4] = False
  mask[1, -3:] = False
  seg = np.ones((4, L), np.int32)
  seg[:2] = mask[:2]
  seg[2] = [1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 0, 0]
  mask[2] = seg[2] > 0
  pos = np.zeros((4, L), np.int32)
  for r in range(4):
    starts = np.r_[0, np.flatnonzero(np.diff(seg[r])) + 1]
    for a, b in zip(starts, np.r_[starts[1:], L]):
      pos[r, a:b] = np.arange(b - a) if seg[r, a] else 0
  return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos), jnp.asarray(seg)


def _loss(model, ids, mask, pos, seg):
  logits = model(ids, mask, pos, segment_ids=seg)
  logp = jax.nn.log_softmax(logits[:, :-1])
  tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  weight = mask[:, 1:] & (seg[:, 1:] == seg[:, :-1])
  return -jnp.sum(tok * weight) / jnp.sum(weight), logits


def _run(impl, scan=True, remat=False, mesh=None):
  """(logits at real tokens, loss, flat grads) of the model under `impl`."""
  model = CausalLM(CONFIG, rngs=nnx.Rngs(0), scan_layers=scan, attention=impl, mesh=mesh)
  model.remat = remat
  batch = _batch()
  if mesh is not None:
    batch = [jax.device_put(x, sharding.named_sharding(mesh, ("batch", None), x.shape))
             for x in batch]
  (loss, logits), grads = nnx.value_and_grad(_loss, has_aux=True)(model, *batch)
  real = np.asarray(batch[1])
  flat = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}
  return np.asarray(logits)[real], float(loss), flat


def _diffs(got, want):
  logits = np.abs(got[0] - want[0]).max()
  grads = max(np.abs(got[2][k] - want[2][k]).max() for k in want[2])
  return logits, abs(got[1] - want[1]), grads


@pytest.fixture(scope="module")
def reference():
  return {scan: _run("einsum", scan) for scan in (True, False)}


@pytest.mark.parametrize("impl,scan,remat", [("xla", True, False), ("xla", False, True),
                                             ("splash_interpret", True, True),
                                             ("splash_interpret", False, False)])
def test_kernel_matches_reference(reference, impl, scan, remat):
  logits, loss, grads = _diffs(_run(impl, scan, remat), reference[scan])
  print(f"{impl} scan={scan} remat={remat}: logits {logits:.2e} loss {loss:.2e} "
        f"grads {grads:.2e}")
  assert logits < 1e-5 and loss < 1e-6 and grads < 1e-5


@pytest.mark.parametrize("impl", ["xla", "splash_interpret"])
def test_kernel_sharded_matches_reference(reference, impl):
  """Batch (4 rows) over fsdp=4 and KV heads over tensor=2 (splash: under shard_map)."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  logits, loss, grads = _diffs(_run(impl, mesh=mesh), reference[True])
  print(f"{impl} sharded: logits {logits:.2e} loss {loss:.2e} grads {grads:.2e}")
  assert logits < 1e-5 and loss < 1e-6 and grads < 1e-5


@pytest.mark.parametrize("packed", [True, False])
def test_segments_equal_dense_mask(packed):
  """The kernels' structured mask (pad keys in their own segment) is the reference's dense
  mask for every real query, and for right-padding queries too when unpacked."""
  _, mask, _, seg = [np.asarray(x) for x in _batch()]
  segs = attention.Segments.from_mask(jnp.asarray(mask), jnp.asarray(seg) if packed else None,
                                      "einsum")
  idx = np.arange(L)
  for window in (None, 3):
    dense = np.asarray(attention.segment_mask(segs.q_segment_ids, segs.segment_ids, window))
    want = (idx[None, :] <= idx[:, None])[None] & mask[:, None, :]
    if packed:
      want &= seg[:, :, None] == seg[:, None, :]
    if window:
      want &= (idx[None, :] > idx[:, None] - window)[None]
    rows = mask | ((not packed) & (np.cumsum(mask, axis=1) > 0))
    np.testing.assert_array_equal(dense[rows], want[rows])


def test_decode_keeps_dense_path():
  """A kernel model's greedy cached decode (dense path) equals its full forward (kernel)."""
  model = CausalLM(CONFIG, rngs=nnx.Rngs(0), attention="xla")
  ids, mask, pos, _ = _batch()
  from stt_jax.models.decoder import KVCache  # pylint: disable=g-import-not-at-top
  cache = KVCache.zeros(CONFIG, 1, L)
  cached, _ = model.forward_cached(ids[:1], mask[:1], pos[:1], cache)
  full = model(ids[:1], mask[:1], pos[:1])
  real = np.asarray(mask[0])
  np.testing.assert_allclose(np.asarray(cached)[0][real], np.asarray(full)[0][real], atol=1e-5)


@pytest.mark.parametrize("platform,dtype,head_dim,want", [
    ("cpu", "float32", 64, "xla"), ("cpu", "bfloat16", 64, "xla"),
    ("tpu", "bfloat16", 64, "splash"), ("gpu", "bfloat16", 128, "cudnn"),
    ("gpu", "float32", 128, "xla"), ("gpu", "bfloat16", 12, "xla")])
def test_auto_picks_per_platform(platform, dtype, head_dim, want):
  assert attention.resolve("auto", dtype, head_dim, platform) == want


@pytest.mark.parametrize("requested,platform,dtype,words", [
    ("cudnn", "cpu", "bfloat16", "needs a GPU"), ("cudnn", "gpu", "float32", "bfloat16"),
    ("splash", "gpu", "bfloat16", "TPU kernel"), ("flash", "cpu", "float32", "one of")])
def test_impossible_request_is_one_line(requested, platform, dtype, words):
  with pytest.raises(attention.AttentionError) as e:
    attention.resolve(requested, dtype, 64, platform)
  msg = str(e.value)
  assert "\n" not in msg and "model.attention" in msg and words in msg
  assert "; use " in msg


def test_cudnn_on_cpu_model_fails_at_construction():
  with pytest.raises(attention.AttentionError, match=r"model.attention='cudnn'.*GPU"):
    CausalLM(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), attention="cudnn")


def test_run_config_key_reaches_the_trained_model(tmp_path):
  cfg = run_config.get_config()
  assert cfg.model.attention == "auto"
  assert set(run_config.CHOICES["model.attention"]) == set(attention.IMPLEMENTATIONS)
  cfg.model.attention = "flash"
  with pytest.raises(run_config.ConfigKeyError, match="model.attention"):
    run_config.check_schema(cfg, run_config.get_config(), run_config.CHOICES)
  cfg.model.attention = "einsum"
  assert train.attention(cfg) == "einsum"
  folder = hf_tiny.make_tiny("qwen2", str(tmp_path / "m"))
  model = train._prepare_model(folder, cfg.train, sharding.make_mesh(), attention_impl="einsum")  # pylint: disable=protected-access
  assert model.attention == "einsum"
  assert load_hf(folder)[0].attention == "xla"  # auto on CPU.


@pytest.mark.parametrize("impl", ["xla", "splash_interpret"])
def test_right_padding_queries_match_reference(impl):
  """Unpacked right padding: even the padding positions' logits are the reference's (HF's);
  for splash, those whose window (3) holds no real token excepted (an all-masked row: the
  reference averages every value, splash the values its blocks visit)."""
  ids, mask, _, _ = _batch()  # Row 1: 9 real tokens, 3 pads.
  want = CausalLM(CONFIG, rngs=nnx.Rngs(0), attention="einsum")(ids[1:2], mask[1:2])
  got = CausalLM(CONFIG, rngs=nnx.Rngs(0), attention=impl)(ids[1:2], mask[1:2])
  upto = L if impl == "xla" else 9 + 3 - 1
  np.testing.assert_allclose(np.asarray(got)[:, :upto], np.asarray(want)[:, :upto], atol=1e-5)


def test_preflight_names_model_attention(tmp_path):
  """A run asking for cuDNN on this CPU stops before any stage, in one line."""
  from stt_jax import preflight  # pylint: disable=g-import-not-at-top
  cfg = run_config.get_config()
  cfg.model.path = hf_tiny.make_tiny("qwen2", str(tmp_path / "m"))
  cfg.model.attention = "cudnn"
  with pytest.raises(attention.AttentionError, match="model.attention='cudnn'"):
    preflight.check_attention(cfg, ("train",))
  preflight.check_attention(cfg, ("train",), platform="gpu")  # bf16 training: fits.
  with pytest.raises(attention.AttentionError, match="float32"):
    cfg.model.dtype = "float32"
    preflight.check_attention(cfg, ("eval",), platform="gpu")
