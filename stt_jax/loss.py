"""The training loss: next-token NLL summed over target tokens, with bounded logits memory.

Returns a (sum, count) pair rather than a mean so that micro-batches of a gradient-accumulation
step add up to exactly the loss of the whole batch (the train step divides once, at the end).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from stt_jax.models.decoder import CausalLM

# The loss's float32 logits are materialised at most this many bytes at a time. Larger
# batches project chunks of positions under `jax.checkpoint` (8 x 256 tokens of a 152k
# vocabulary would otherwise hold 1.2 GB of logits for the backward pass); smaller ones
# project at once, which skips the recomputation.
LOSS_LOGITS_BYTES = 256 * 2**20


def _nll_sum(model: CausalLM, hidden, targets, mask) -> jax.Array:
  """Masked sum of -log p(target) from final hidden states [B, L, E]."""
  logits = model.logits(hidden)
  logz = jax.nn.logsumexp(logits, axis=-1)
  # The gold logit by a one-hot select: its gradient is elementwise (no scatter), and it
  # reduces locally when the vocabulary is split over devices.
  onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
  gold = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  return jnp.sum((logz - gold) * mask)


def token_loss_sum(model: CausalLM, batch: Mapping[str, jax.Array],
                   max_logits_bytes: int = LOSS_LOGITS_BYTES) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL over target tokens, number of target tokens) of one batch."""
  seg = batch["segment_ids"]
  hidden = model.hidden_states(batch["inputs"], seg > 0, batch["positions"], segment_ids=seg)
  mask = batch["loss_mask"].astype(jnp.float32)
  targets = batch["targets"]
  b, l, _ = hidden.shape
  chunk = max(1, min(l, max_logits_bytes // (4 * b * model.config.vocab_size)))
  if chunk >= l:
    return _nll_sum(model, hidden, targets, mask), jnp.sum(mask)
  pad = -l % chunk
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = (l + pad) // chunk
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
  chunk_nll = jax.checkpoint(functools.partial(_nll_sum, model))

  def body(total, xs):
    return total + chunk_nll(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (split(hidden), split(targets),
                           split(jnp.pad(mask, ((0, 0), (0, pad))))))
  return total, jnp.sum(mask)
