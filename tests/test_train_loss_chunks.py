"""The LM-head loss, at once or in chunks, equals the loss over full logits (value and
gradient)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stt_jax import loss as loss_lib
from stt_jax.models import load_hf
from tests import hf_tiny


def _naive(model, batch):
  seg = batch["segment_ids"]
  logits = model(batch["inputs"], seg > 0, batch["positions"], segment_ids=seg)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, batch["targets"][..., None], -1)[..., 0]
  m = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(nll * m), jnp.sum(m)


def test_chunked_loss_matches_full_logits(tmp_path):
  model, _ = load_hf(hf_tiny.make_tiny("llama_head_dim_tied", str(tmp_path / "m")))
  rng = np.random.default_rng(0)
  b, l = 2, 300  # Not a multiple of the chunk: exercises the padding path.
  batch = {"inputs": jnp.asarray(rng.integers(3, hf_tiny.VOCAB, (b, l)), jnp.int32),
           "targets": jnp.asarray(rng.integers(3, hf_tiny.VOCAB, (b, l)), jnp.int32),
           "segment_ids": jnp.asarray(np.repeat([[1] * 200 + [2] * 90 + [0] * 10], b, 0)),
           "positions": jnp.asarray(np.repeat([list(range(200)) + list(range(90)) + [0] * 10],
                                              b, 0)),
           "loss_mask": jnp.asarray(rng.random((b, l)) < 0.5)}
  graphdef, state = nnx.split(model)

  def loss(fn, s):
    total, count = fn(nnx.merge(graphdef, s), batch)
    return total / count

  want, g_want = jax.value_and_grad(lambda s: loss(_naive, s))(state)
  # 2 x 300 x 256 float32 logits are 600 KiB: a 64 KiB budget forces chunks of 32 positions.
  for budget in (loss_lib.LOSS_LOGITS_BYTES, 64 * 1024):
    fn = functools.partial(loss_lib.token_loss_sum, max_logits_bytes=budget)
    got, g_got = jax.value_and_grad(lambda s, fn=fn: loss(fn, s))(state)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, w in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
      np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-6)


# Scanned layers compile the remat'ed layer body apart from the plain one (a scan body is
# one XLA computation), so activations differ by float32 ulps and gradients of ~1e-3 by
# ~1e-7: atol 1e-6 there; the unrolled layers keep the original 1e-7.
@pytest.mark.parametrize("scan,atol", [(False, 1e-7), (True, 1e-6)])
def test_layer_remat_gives_the_same_loss_and_gradients(tmp_path, scan, atol):
  model, _ = load_hf(hf_tiny.make_tiny("qwen2", str(tmp_path / "m")), scan_layers=scan)
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(3, hf_tiny.VOCAB, (2, 40)), jnp.int32)
  graphdef, state = nnx.split(model)

  def loss(s, remat):
    m = nnx.merge(graphdef, s)
    m.remat = remat
    return jnp.mean(m(ids)[..., :7] ** 2)

  plain, g_plain = jax.value_and_grad(lambda s: loss(s, False))(state)
  remat, g_remat = jax.value_and_grad(lambda s: loss(s, True))(state)
  np.testing.assert_allclose(remat, plain, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
