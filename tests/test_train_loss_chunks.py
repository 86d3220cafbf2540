"""The LM-head loss, at once, in chunks or at target positions only, equals the loss over
full logits (value and gradient); no packing puts more targets in a row than the width the
target-only loss gathers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stt_jax import loss as loss_lib
from stt_jax import train_data
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
  # Target-only: the head at each row's <= 176 target positions (gathered, then chunked too).
  width = int(np.max(np.sum(np.asarray(batch["loss_mask"]), axis=1)))
  assert width < l
  for budget, w in ((loss_lib.LOSS_LOGITS_BYTES, None), (64 * 1024, None),
                    (loss_lib.LOSS_LOGITS_BYTES, width), (64 * 1024, width + 5)):
    fn = functools.partial(loss_lib.token_loss_sum, max_logits_bytes=budget, target_width=w)
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


def test_no_packing_exceeds_the_target_width():
  """XNLI-shaped examples (a long prompt, 2 target tokens) and a few target-heavy ones: every
  packed row of several epochs holds at most `target_width` targets, which stays far below
  seq_len while the targets are a small share of each example."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(30, 120, 300)
  prompt = lengths - 1  # 2 targets: the label token and EOS (n = length - 1 positions).
  prompt[:5] = 3        # A few examples that are mostly target.
  tokens = [np.arange(n + 1) for n in lengths]
  for heavy in (False, True):
    p = prompt.copy() if heavy else np.maximum(prompt, lengths - 1)
    ex = train_data.Examples(tokens=tokens, prompt_len=p, source=np.zeros(300, np.int64),
                             sources=("en",))
    width = ex.target_width(256)
    assert (width == 256) if heavy else (width <= 32)
    it = train_data.BatchIterator(ex, batch_size=4, seq_len=256, packing=True,
                                  weights={"en": 1.0}, seed=1)
    most = 0
    for _ in range(3 * it.batches_in_epoch(0)):
      most = max(most, int(np.max(np.sum(it.next().loss_mask, axis=1))))
    assert 0 < most <= width
