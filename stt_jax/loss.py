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


def target_positions(mask: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """(positions [B, width], valid [B, width]): each row's target positions (mask > 0) in
  order, padded with position 0 marked invalid. A row with more than `width` targets would
  lose the rest; `train_data.Examples.target_width` gives a width no packing can exceed."""
  b, l = mask.shape
  on = mask > 0
  rank = jnp.where(on, jnp.cumsum(on, axis=1) - 1, width)  # width: dropped by the scatter.
  pos = jnp.zeros((b, width), jnp.int32).at[jnp.arange(b)[:, None], rank].set(
      jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)), mode="drop")
  valid = jnp.arange(width)[None, :] < jnp.sum(on, axis=1, keepdims=True)
  return pos, valid


def token_loss_sum(model: CausalLM, batch: Mapping[str, jax.Array],
                   max_logits_bytes: int = LOSS_LOGITS_BYTES, target_width: int | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL over target tokens, number of target tokens) of one batch.

  target_width: project the LM head only at each row's first `target_width` target
  positions (gathered before the head) instead of at every position. XNLI rows hold ~2
  target tokens per ~70, and the head is a fifth of a small model's weights.
  """
  seg = batch["segment_ids"]
  hidden = model.hidden_states(batch["inputs"], seg > 0, batch["positions"], segment_ids=seg)
  mask = batch["loss_mask"].astype(jnp.float32)
  targets = batch["targets"]
  count = jnp.sum(mask)
  if target_width is not None and target_width < mask.shape[1]:
    pos, valid = target_positions(mask, target_width)
    hidden = jnp.take_along_axis(hidden, pos[..., None], axis=1)
    targets = jnp.take_along_axis(targets, pos, axis=1)
    mask = jnp.where(valid, jnp.take_along_axis(mask, pos, axis=1), 0.0)
  b, l, _ = hidden.shape
  chunk = max(1, min(l, max_logits_bytes // (4 * b * model.config.vocab_size)))
  if chunk >= l:
    return _nll_sum(model, hidden, targets, mask), count
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
  return total, count
