"""Batch-synchronous decoding: one jitted prefill + `lax.while_loop` per (batch, prompt) bucket.

Prompts are left padded into length buckets (multiples of 32, then powers of two) and
fixed-size batches, so a long list compiles a handful of programs (each logged once). Inside one
compiled call the whole prompt batch is prefilled into a preallocated KV cache and new tokens
are produced on device until every row has stopped (EOS, a stop token/sequence, a stop string,
or `max_new_tokens`).

Stop strings are matched exactly on device, on the UTF-8 bytes of the decoded text: each stop
string is a KMP automaton whose state (how many bytes of the stop string the text ends with)
advances by one lookup per generated token in a [states, vocab] table built once per
(tokenizer, stops) on the host. A token's bytes are its text *in context* (Llama-2's '▁The' adds
' The' after other text, 'The' as the first token; byte pieces '<0x0A>' and byte-level BPE
pieces add their raw bytes, so a character split over byte tokens is matched too). The limit:
tokenizers whose decoder is neither byte-level nor SentencePiece-style fall back to decoding
each token after an anchor token, where a token holding part of a UTF-8 character reads as
U+FFFD, so stop strings spanning such a split are not seen on device (trimming still is).
The decoded text is cut at the first stop string on the host (`trim_text`).

This module holds the pieces every decoder shares (sampling settings, stop criteria and
automata, padding and buckets) and `Decoder`, the batch-synchronous reference path;
`stt_jax.engine` is the continuous-batching engine the pipeline uses and
`stt_jax.generation` the text API over it.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from stt_jax import sharding
from stt_jax.models.decoder import KV_CACHE_AXES, CausalLM, KVCache, positions_from_mask

MIN_PROMPT_BUCKET = 16
MIN_SHARED_PREFIX = 32  # Shorter common prefixes are not worth a separate prefill.
_PAD = -1


class DecodeError(ValueError):
  """Bad decoding request (e.g. a prompt longer than the model's context)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Greedy when temperature == 0; otherwise temperature, then top-k (0 = off), then top-p."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0.0


@dataclasses.dataclass(frozen=True)
class StopCriteria:
  """Stop conditions, prepared once per tokenizer and stop strings.

  token_mask: [vocab] bool, tokens that end a row (EOS ids and stop token ids).
  sequences: [n, width] int32, right-aligned token sequences that end a row (padding -1).
  table: [stops, states, vocab] int8/int16, the stop-string automata (see `stop_table`).
  """

  token_mask: np.ndarray
  sequences: np.ndarray
  eos_ids: tuple[int, ...] = ()
  table: np.ndarray | None = None

  @classmethod
  def build(cls, vocab_size: int, eos_ids: Sequence[int] = (), stop_token_ids=(),
            stop_sequences: Sequence[Sequence[int]] = (),
            table: np.ndarray | None = None) -> StopCriteria:
    mask = np.zeros(vocab_size, np.bool_)
    for t in list(eos_ids) + list(stop_token_ids):
      if 0 <= t < vocab_size:
        mask[t] = True
    seqs = [list(s) for s in stop_sequences if len(s) > 1]
    width = max((len(s) for s in seqs), default=1)
    arr = np.full((max(len(seqs), 1), width), _PAD, np.int32)
    for i, s in enumerate(seqs):
      arr[i, width - len(s):] = s
    if table is None:  # No stop strings: one automaton that never fires.
      table = np.zeros((1, 1, vocab_size), np.int8)
    if table.shape[-1] != vocab_size:
      raise DecodeError(f"stop table covers {table.shape[-1]} tokens, the model {vocab_size}; "
                        "build it with stop_table(tokenizer, stops, vocab_size)")
    return cls(token_mask=mask, sequences=arr, eos_ids=tuple(int(t) for t in eos_ids),
               table=table)


def next_pow2(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= n, and at least `minimum` (a padded length or token budget
  from a few sizes, so few compilations)."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


def bucket_length(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
  """Padded length for n tokens: multiples of 32 up to 256 (short prompts waste little),
  powers of two above; at most ~12 distinct lengths up to 4k, so few compilations."""
  if n <= minimum:
    return minimum
  if n <= 256:
    return -(-n // 32) * 32
  return next_pow2(n)


def left_pad(seqs: Sequence[Sequence[int]], length: int,
             rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [rows, length], mask bool): each sequence right-aligned in its row, so the
  last prompt token of every row sits at the same position for the first generated one.

  `rows` (default len(seqs)) pads the batch to a fixed size; extra rows and empty sequences
  are all-False in `mask` (ids 0).
  """
  rows = len(seqs) if rows is None else rows
  if len(seqs) > rows:
    raise DecodeError(f"left_pad: {len(seqs)} sequences do not fit {rows} rows")
  ids = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), np.bool_)
  for r, seq in enumerate(seqs):
    if len(seq) > length:
      raise DecodeError(f"left_pad: sequence {r} has {len(seq)} tokens, more than {length}")
    if len(seq):
      ids[r, length - len(seq):] = seq
      mask[r, length - len(seq):] = True
  return ids, mask


class RateBar:
  """A tqdm bar over items that also shows generated tokens/s (postfix `tok_s`).

  `RateBar(total, desc, unit="item", disable=False)`, used as a context manager (closes the
  bar); `update(items, tokens)` after each batch advances the bar by `items` and adds
  `tokens`. Attributes: `items`, `tokens` (totals so far) and `seconds` (from construction
  to the last update), so callers report the same rate the bar showed.
  """

  def __init__(self, total: int, desc: str, unit: str = "item", disable: bool = False):
    self.items, self.tokens, self.seconds = 0, 0, 0.0
    self._bar = tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
    self._start = time.perf_counter()

  def update(self, items: int, tokens: int, slot_use: float | None = None) -> None:
    self.items += items
    self.tokens += tokens
    self.seconds = time.perf_counter() - self._start
    self._bar.update(items)
    extra = {} if slot_use is None else {"slot_use": f"{slot_use:.0%}"}
    self._bar.set_postfix(tok_s=f"{self.tokens_per_s:.1f}", **extra)

  @property
  def tokens_per_s(self) -> float:
    return self.tokens / max(self.seconds, 1e-9)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> RateBar:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _select(logits: jax.Array, key: jax.Array, temperature, top_p, *, greedy: bool,
            top_k: int) -> jax.Array:
  """Next token from float32 logits [B, V]."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = sampling_logits(logits, temperature, top_p, top_k)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sampling_logits(logits: jax.Array, temperature, top_p, top_k: int) -> jax.Array:
  """float32 logits [B, V] scaled by 1 / temperature, with tokens outside the top-k (0 = off)
  and outside the top-p nucleus set to -inf."""
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  # Smallest set whose mass reaches top_p; the best token always stays.
  cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
  cutoff = jnp.take_along_axis(sorted_logits, jnp.minimum(cutoff_idx, logits.shape[-1] - 1),
                               axis=-1)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def stop_step(tok, recent, matched, stop_mask, stop_seqs, stop_table):
  """After emitting `tok` [B]: (recent tokens [B, width], automaton states [B, stops],
  whether the row stops: an EOS/stop token, a stop sequence, or a completed stop string)."""
  recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
  seq_hit = jnp.all((recent[:, None, :] == stop_seqs[None]) | (stop_seqs[None] == _PAD), -1)
  seq_hit &= jnp.any(stop_seqs != _PAD, axis=-1)[None]
  # Stop-string automata: one table lookup per (row, stop string); -1 = the string is done.
  which = jnp.arange(stop_table.shape[0])[None, :]
  nxt_state = stop_table[which, matched, tok[:, None]].astype(jnp.int32)
  stop = stop_mask[tok] | jnp.any(seq_hit, axis=-1) | jnp.any(nxt_state < 0, axis=-1)
  return recent, jnp.maximum(nxt_state, 0), stop


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k",
                                          "kv_dtype"))
def _decode_batch(graphdef, state, prefix, prefix_mask, ids, mask, key, temperature, top_p,
                  stop_mask, stop_seqs, stop_table, *, max_new_tokens: int, greedy: bool,
                  top_k: int, kv_dtype):
  """Prefill `prefix` [1, C] once and `ids` [B, P] (left padded) after it, then decode up to
  `max_new_tokens` on device. A shared few-shot prefix is computed once, not B times; C = 0
  means no shared prefix. The KV cache holds keys and values in `kv_dtype`.

  Returns (tokens [B, max_new_tokens] with -1 after a row stopped, lengths [B], stopped [B]:
  the row ended by EOS or a stop, not by the budget).
  """
  model: CausalLM = nnx.merge(graphdef, state)
  b, p = ids.shape
  c = prefix.shape[1]
  select = functools.partial(_select, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k)
  total = c + p + max_new_tokens
  offset = jnp.sum(prefix_mask, dtype=jnp.int32)
  if c:
    one = KVCache.zeros(model.config, 1, total, kv_dtype)
    _, one = model.forward_cached(prefix, prefix_mask, positions_from_mask(prefix_mask), one,
                                  last_only=True)
    cache = KVCache(
        k=sharding.constrain(jnp.repeat(one.k, b, axis=1), model.mesh, KV_CACHE_AXES),
        v=sharding.constrain(jnp.repeat(one.v, b, axis=1), model.mesh, KV_CACHE_AXES),
        valid=jnp.repeat(one.valid, b, axis=0), index=one.index)
  else:
    cache = KVCache.zeros(model.config, b, total, kv_dtype, model.mesh)
  logits, cache = model.forward_cached(ids, mask, offset + positions_from_mask(mask), cache,
                                       last_only=True)
  first = select(logits[:, -1], jax.random.fold_in(key, 0))
  width = stop_seqs.shape[1]
  n_stops, n_states = stop_table.shape[:2]

  def cond(carry):
    step, _, _, _, done, _, _, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, tok, cache, out, done, lengths, pos, recent, matched = carry
    out = out.at[:, step].set(jnp.where(done, _PAD, tok))
    recent, matched, stop = stop_step(tok, recent, matched, stop_mask, stop_seqs, stop_table)
    lengths = jnp.where(done, lengths, step + 1)
    done = done | stop
    logits, cache = model.forward_cached(tok[:, None], jnp.ones((b, 1), jnp.bool_),
                                         pos[:, None], cache)
    nxt = select(logits[:, 0], jax.random.fold_in(key, step + 1))
    return step + 1, nxt, cache, out, done, lengths, pos + 1, recent, matched

  out = jnp.full((b, max_new_tokens), _PAD, jnp.int32)
  done = ~jnp.any(mask, axis=-1)  # Batch-filler rows are done from the start.
  lengths = jnp.zeros((b,), jnp.int32)
  pos = offset + jnp.sum(mask, axis=-1).astype(jnp.int32)
  recent = jnp.full((b, width), _PAD, jnp.int32)
  matched = jnp.full((b, n_stops), n_states - 1, jnp.int32)  # The last row: the start state.
  filler = done
  carry = (jnp.int32(0), first, cache, out, done, lengths, pos, recent, matched)
  _, _, _, out, done, lengths, _, _, _ = jax.lax.while_loop(cond, body, carry)
  return out, lengths, done & ~filler


def fit_context(prompt: Sequence[int], index: int, max_new_tokens: int, max_len: int,
                truncate: str = "error") -> list[int]:
  """Prompt `index` under the context-length policy: 'error' (default) or 'left' (keep its
  last tokens) when it and its `max_new_tokens` exceed `max_len`."""
  limit = max_len - max_new_tokens
  if limit <= 0:
    raise DecodeError(f"max_new_tokens={max_new_tokens} leaves no room in the model's context "
                      f"of {max_len} tokens")
  if len(prompt) > limit:
    if truncate == "left":
      return list(prompt[-limit:])
    if truncate == "error":
      raise DecodeError(
          f"prompt {index} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it "
          f"exceeds the model's context of {max_len}. Shorten it or pass truncate='left' to "
          "keep its last tokens")
    raise DecodeError(f"truncate={truncate!r}; use 'error' or 'left'")
  return list(prompt)


def shared_prefix_len(prompts: Sequence[Sequence[int]], minimum: int = MIN_SHARED_PREFIX) -> int:
  """Tokens every prompt starts with (each keeps at least one of its own), if >= minimum."""
  real = [p for p in prompts if p]
  if len(real) < 2:
    return 0
  first, n = real[0], min(len(p) for p in real) - 1
  for p in real[1:]:
    k, limit = 0, min(n, len(p))
    while k < limit and p[k] == first[k]:
      k += 1
    n = k
  return n if n >= minimum else 0


class Decoder:
  """Decodes token-id prompts with a model; keeps its compiled buckets across calls.

  kv_dtype: the KV cache's dtype (default the model's compute dtype).
  """

  def __init__(self, model: CausalLM, batch_size: int = 8, mesh=None, max_len: int | None = None,
               share_prefix: bool = True, kv_dtype=None):
    self.model = model
    self.kv_dtype = jnp.dtype(kv_dtype or model.dtype)
    self.share_prefix = share_prefix
    self.mesh = mesh if mesh is not None else model.mesh
    self.batch_size = batch_size
    if self.mesh is not None:  # Batch rows are split over data (and fsdp) axes.
      split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      self.batch_size = -(-batch_size // split) * split
    self.max_len = max_len or model.config.max_position_embeddings
    self.graphdef, self.state = nnx.split(model)
    self.compiled: set[tuple] = set()

  def check_lengths(self, prompts: list[list[int]], max_new_tokens: int,
                    truncate: str = "error") -> list[list[int]]:
    """Applies the context-length policy: 'error' (default) or 'left' (keep the last tokens)."""
    return [fit_context(p, i, max_new_tokens, self.max_len, truncate)
            for i, p in enumerate(prompts)]

  def shared_prefix_len(self, prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with (each keeps at least one of its own), if worth sharing."""
    if not self.share_prefix:
      return 0
    if any(self.model.config.sliding_windows or ()):
      # The padding between a left-padded prefix and the prompts would count as distance
      # inside a sliding window; the engine (no padding inside a sequence) has no such limit.
      return 0
    return shared_prefix_len(prompts)

  def run_batch(self, prompts: list[list[int]], max_new_tokens: int, stop: StopCriteria,
                sampling: Sampling, batch_index: int = 0) -> list[list[int]]:
    """Decodes up to `batch_size` prompts; returns generated ids per prompt (stop token kept)."""
    return [ids for ids, _ in self.run_batch_stopped(prompts, max_new_tokens, stop, sampling,
                                                     batch_index)]

  def run_batch_stopped(self, prompts: list[list[int]], max_new_tokens: int, stop: StopCriteria,
                        sampling: Sampling, batch_index: int = 0
                        ) -> list[tuple[list[int], bool]]:
    """Like `run_batch`, with whether each row ended by EOS/stop (False: budget used up)."""
    n = len(prompts)
    b = self.batch_size if n <= self.batch_size else n
    shared = self.shared_prefix_len(prompts)
    prefix, prefix_mask = left_pad([prompts[0][:shared]], bucket_length(shared) if shared else 0)
    prompts = [p[shared:] for p in prompts]
    longest = max(len(p) for p in prompts)
    p_len = min(bucket_length(longest), self.max_len - max_new_tokens - prefix.shape[1])
    p_len = max(p_len, longest)
    ids, mask = left_pad(prompts, p_len, rows=b)
    key = (b, prefix.shape[1], p_len, max_new_tokens, sampling.greedy, sampling.top_k,
           stop.table.shape)
    if key not in self.compiled:
      self.compiled.add(key)
      logging.info("decode: compiling bucket batch=%d shared_prefix=%d prompt_len=%d max_new=%d "
                   "stop_table=%s (%d buckets so far)", b, prefix.shape[1], p_len,
                   max_new_tokens, stop.table.shape, len(self.compiled))
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    if self.mesh is not None:
      spec = sharding.named_sharding(self.mesh, ("batch", None), ids.shape)
      ids_j, mask_j = jax.device_put(ids_j, spec), jax.device_put(mask_j, spec)
    rng = jax.random.fold_in(jax.random.PRNGKey(sampling.seed), batch_index)
    out, lengths, stopped = _decode_batch(
        self.graphdef, self.state, jnp.asarray(prefix), jnp.asarray(prefix_mask), ids_j, mask_j,
        rng,
        jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p),
        jnp.asarray(stop.token_mask), jnp.asarray(stop.sequences), jnp.asarray(stop.table),
        max_new_tokens=max_new_tokens, greedy=sampling.greedy, top_k=sampling.top_k,
        kv_dtype=self.kv_dtype)
    out, lengths, stopped = np.asarray(out), np.asarray(lengths), np.asarray(stopped)
    results = []
    for r in range(n):
      m = int(lengths[r]) if lengths[r] else max_new_tokens
      results.append(([int(t) for t in out[r, :m] if t != _PAD], bool(stopped[r])))
    return results

  def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stop: StopCriteria, sampling: Sampling = Sampling(),
                   truncate: str = "error", progress: bool = False,
                   desc: str = "decode") -> Iterator[tuple[int, list[int]]]:
    """Yields (prompt index, generated ids) batch by batch, longest prompts first."""
    for i, ids, _ in self.generate_ids_stopped(prompts, max_new_tokens, stop, sampling,
                                               truncate, progress, desc):
      yield i, ids

  def generate_ids_stopped(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                           stop: StopCriteria, sampling: Sampling = Sampling(),
                           truncate: str = "error", progress: bool = False,
                           desc: str = "decode") -> Iterator[tuple[int, list[int], bool]]:
    """Like `generate_ids`, with whether each row ended by EOS/stop (see run_batch_stopped)."""
    prompts = self.check_lengths([list(p) for p in prompts], max_new_tokens, truncate)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with RateBar(len(prompts), desc, disable=not progress) as bar:
      for k in range(0, len(order), self.batch_size):
        chunk = order[k:k + self.batch_size]
        outs = self.run_batch_stopped([prompts[i] for i in chunk], max_new_tokens, stop,
                                      sampling, batch_index=k // self.batch_size)
        for i, (o, stopped) in zip(chunk, outs):
          yield i, o, stopped
        bar.update(len(chunk), sum(len(o) for o, _ in outs))


# ------------------------------------------------------------------------------ stop strings

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_VERIFY = 512  # Token texts checked against the tokenizer's own decode (plus every added one).


@dataclasses.dataclass
class TokenBytes:
  """UTF-8 bytes each token adds to the decoded text: `ctx` after other text, `lone` as the
  first token of a completion (Llama-2's decoder drops that token's leading space). Special
  tokens add nothing: completions are decoded with skip_special_tokens."""

  ctx: list[bytes]
  lone: list[bytes]

  @functools.cached_property
  def index(self) -> _VocabIndex:
    return _VocabIndex(self)


class _VocabIndex:
  """The token bytes sorted forwards and reversed, so tokens by prefix, suffix or exact text
  are contiguous ranges (bisect), not a scan of the vocabulary per automaton state."""

  def __init__(self, texts: TokenBytes):
    ctx = texts.ctx
    self.texts, self.size = texts, len(ctx)
    self.fwd_order = np.array(sorted(range(len(ctx)), key=ctx.__getitem__), np.int64)
    self.fwd_keys = [ctx[i] for i in self.fwd_order]
    rev = [w[::-1] for w in ctx]
    self.rev_order = np.array(sorted(range(len(ctx)), key=rev.__getitem__), np.int64)
    self.rev_keys = [rev[i] for i in self.rev_order]
    self.empty = np.array([not w for w in ctx], np.bool_)
    self.differ = [i for i, (c, l) in enumerate(zip(ctx, texts.lone)) if c != l]

  @staticmethod
  def _prefixed(keys: list[bytes], order: np.ndarray, prefix: bytes) -> np.ndarray:
    lo = bisect.bisect_left(keys, prefix)
    up = prefix.rstrip(b"\xff")  # Smallest bytes above every string starting with prefix.
    hi = len(keys) if not up else bisect.bisect_left(keys, up[:-1] + bytes([up[-1] + 1]))
    return order[lo:hi]

  def starting(self, prefix: bytes) -> np.ndarray:
    return self._prefixed(self.fwd_keys, self.fwd_order, prefix)

  def ending(self, suffix: bytes) -> np.ndarray:
    return self._prefixed(self.rev_keys, self.rev_order, suffix[::-1])

  def exactly(self, text: bytes) -> np.ndarray:
    lo = bisect.bisect_left(self.fwd_keys, text)
    return self.fwd_order[lo:bisect.bisect_right(self.fwd_keys, text, lo)]


def _borders(stop: bytes) -> list[int]:
  """KMP failure function: fail[k] = length of the longest proper border of stop[:k]."""
  fail, j = [0] * (len(stop) + 1), 0
  for k in range(1, len(stop)):
    while j and stop[k] != stop[j]:
      j = fail[j]
    if stop[k] == stop[j]:
      j += 1
    fail[k + 1] = j
  return fail


def _scan(stop: bytes, fail: list[int], text: bytes) -> int:
  """State after `text` from an empty text, byte by byte (-1: `stop` found)."""
  k = 0
  for byte in text:
    while k and byte != stop[k]:
      k = fail[k]
    if byte == stop[k]:
      k += 1
    if k == len(stop):
      return -1
  return k


def _automaton(stop: bytes, index: _VocabIndex, start: int) -> np.ndarray:
  """[start + 1, vocab] int16 next-state table of one stop string.

  Row k < len(stop): the text ends with stop[:k] (and no longer prefix); row `start`: nothing
  generated yet (first-token texts). Entry -1: the text now contains `stop`. A token's effect
  from row k is, without a per-byte loop: a hit if `stop` is inside it or it starts with
  stop[m:] for a border m of stop[:k]; else the longest of (its suffix that is a prefix of
  `stop`, m + its length when it equals stop[m:m + len]). Rows len(stop)..start-1 pad to the
  longest stop string and are never reached.
  """
  n, texts = index.size, index.texts
  fail = _borders(stop)
  inside = np.fromiter((stop in w for w in texts.ctx), np.bool_, n)
  tail = np.zeros(n, np.int16)
  for j in range(1, len(stop)):  # Increasing j: the longest suffix wins.
    tail[index.ending(stop[:j])] = j
  starts = {m: index.starting(stop[m:]) for m in range(1, len(stop))}
  table = np.zeros((start + 1, n), np.int16)
  for k in range(len(stop)):
    chain = [k]
    while chain[-1]:
      chain.append(fail[chain[-1]])
    hit, nxt = inside.copy(), tail.copy()
    for m in chain:
      if m:
        hit[starts[m]] = True
      for length in range(1, len(stop) - m):
        ids = index.exactly(stop[m:m + length])
        nxt[ids] = np.maximum(nxt[ids], m + length)
    nxt[index.empty] = k
    table[k] = np.where(hit, -1, nxt)
  first = table[0].copy()
  first[index.empty] = start  # Nothing decoded yet (special tokens): still the start.
  for i in index.differ:  # A lone ' ' that the decoder drops leaves an empty text: state 0.
    first[i] = _scan(stop, fail, texts.lone[i])
  table[start] = first
  return table


def build_stop_table(texts: TokenBytes, stops: Sequence[str],
                     vocab_size: int | None = None) -> np.ndarray | None:
  """[stops, states, vocab_size] automata of `stops` over tokens with `texts` (None: no stops).

  The last state row is the start; states are padded to a multiple of 8 (stop strings of
  similar length share one compiled decode program). Tokens past the tokenizer's vocabulary
  change nothing. int8 for stop strings up to 119 UTF-8 bytes, else int16.
  """
  encoded = [s.encode("utf-8") for s in dict.fromkeys(stops) if s]
  if not encoded:
    return None
  start = -(-(max(len(s) for s in encoded) + 1) // 8) * 8 - 1
  if start >= np.iinfo(np.int16).max:
    raise DecodeError(f"stop string of {start} bytes; use stop strings under 32767 bytes")
  table = np.stack([_automaton(s, texts.index, start) for s in encoded])
  n = texts.index.size
  vocab_size = n if vocab_size is None else vocab_size
  if vocab_size > n:
    keep = np.broadcast_to(np.arange(start + 1, dtype=np.int16)[None, :, None],
                           (len(encoded), start + 1, vocab_size - n))
    table = np.concatenate([table, keep], axis=-1)
  table = table[..., :vocab_size]
  return table.astype(np.int8 if start < np.iinfo(np.int8).max else np.int16)


def _decoder_kind(tokenizer) -> tuple[str | None, bool]:
  """('bytelevel' | 'sentencepiece' | None, whether a completion's first leading space is
  dropped), read from a fast tokenizer's decoder."""
  decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
  try:
    spec = json.loads(decoder.__getstate__())
  except (AttributeError, TypeError, ValueError):
    return None, False
  parts = spec.get("decoders") or [spec]
  types = [p.get("type") for p in parts]
  if "ByteLevel" in types:
    return "bytelevel", False
  meta = [p for p in parts if p.get("type") == "Metaspace"]
  if meta or any(p.get("type") == "Replace" and p.get("pattern", {}).get("String") == "\u2581"
                 for p in parts):
    strip = any(p.get("type") == "Strip" and p.get("start", 0) > 0 for p in parts) or any(
        m.get("prepend_scheme", "always") != "never" and m.get("add_prefix_space", True)
        for m in meta)
    return "sentencepiece", strip
  return None, False


def _decode_each(tokenizer, ids: Sequence[int]) -> tuple[list[bytes], list[bytes]]:
  """Token bytes by decoding: after an anchor token minus the anchor, and alone. Slow on big
  vocabularies; a token holding part of a UTF-8 character reads as U+FFFD here."""
  kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
  anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
  head = tokenizer.decode([anchor], **kw)
  pairs = tokenizer.batch_decode([[anchor, i] for i in ids], **kw)
  lone = tokenizer.batch_decode([[i] for i in ids], **kw)
  ctx = [p[len(head):] if p.startswith(head) else l for p, l in zip(pairs, lone)]
  return [c.encode("utf-8") for c in ctx], [l.encode("utf-8") for l in lone]


def _from_pieces(tokenizer, n: int, kind: str, strip: bool) -> TokenBytes:
  """Token bytes from the vocabulary pieces (fast: no decode per token)."""
  pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
  if kind == "bytelevel":
    from stt_jax.models.gguf_convert import bytes_to_unicode  # pylint: disable=g-import-not-at-top
    table = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(p: str) -> bytes:
      try:
        return bytes(map(table.__getitem__, p))
      except KeyError:
        return p.encode("utf-8")
  else:

    def to_bytes(p: str) -> bytes:
      m = _BYTE_PIECE.fullmatch(p) if p.startswith("<0x") else None
      return bytes([int(m[1], 16)]) if m else p.replace("\u2581", " ").encode("utf-8")

  ctx = [to_bytes(p) if p else b"" for p in pieces]
  lone = [c[1:] if strip and c[:1] == b" " else c for c in ctx]
  added = sorted({i for i in getattr(tokenizer, "added_tokens_decoder", {})} |
                 set(tokenizer.all_special_ids))
  added = [i for i in added if 0 <= i < n]
  if added:  # Added/special tokens are not decoded through the pieces: ask the tokenizer.
    for i, c, l in zip(added, *_decode_each(tokenizer, added)):
      ctx[i], lone[i] = c, l
  return TokenBytes(ctx, lone)


def token_bytes(tokenizer) -> TokenBytes:
  """What each token adds to decoded text, for stop-string automata.

  Byte-level BPE (GPT-2/Llama-3/Qwen) and SentencePiece-style (Llama-2/Mistral: '▁' = space,
  '<0xNN>' byte pieces) decoders are read from the pieces and checked against the tokenizer's
  own decode on a sample; any other tokenizer, or a failed check, decodes each token (slower).
  """
  n = len(tokenizer)
  kind, strip = _decoder_kind(tokenizer)
  if kind:
    texts = _from_pieces(tokenizer, n, kind, strip)
    sample = sorted(set(range(min(n, _VERIFY))) | set(range(0, n, max(1, n // _VERIFY))))
    got = [(texts.ctx[i], texts.lone[i]) for i in sample]
    want = list(zip(*_decode_each(tokenizer, sample)))
    readable = lambda pair: tuple(b.decode("utf-8", "replace") for b in pair)
    if [readable(p) for p in got] == [readable(p) for p in want]:
      return texts
    logging.warning("decode: %s token texts disagree with its decode; decoding each of the %d "
                    "tokens for stop strings instead", type(tokenizer).__name__, n)
  return TokenBytes(*_decode_each(tokenizer, range(n)))


@functools.lru_cache(maxsize=4)
def _token_bytes_cached(tokenizer) -> TokenBytes:
  return token_bytes(tokenizer)


@functools.lru_cache(maxsize=16)
def stop_table(tokenizer, stops: tuple[str, ...], vocab_size: int) -> np.ndarray | None:
  """The stop-string automata for `tokenizer` (cached: built once per tokenizer and stops)."""
  start = time.perf_counter()
  table = build_stop_table(_token_bytes_cached(tokenizer), stops, vocab_size)
  if table is not None:
    table.flags.writeable = False
    logging.info("decode: stop-string table %s %s for %r in %.2fs", table.shape, table.dtype,
                 stops, time.perf_counter() - start)
  return table


def stop_criteria(tokenizer, config, stop: Sequence[str] = ("\n",),
                  eos: bool = True) -> StopCriteria:
  """Stop-string automata for `stop` plus the model's and tokenizer's EOS ids."""
  eos_ids = set(config.eos_token_id) if eos else set()
  if eos and tokenizer.eos_token_id is not None:
    eos_ids.add(int(tokenizer.eos_token_id))
  vocab = max(config.vocab_size, len(tokenizer))
  return StopCriteria.build(vocab, sorted(eos_ids),
                            table=stop_table(tokenizer, tuple(s for s in stop if s), vocab))


def trim_text(text: str, stop: Sequence[str]) -> str:
  """Cuts `text` at the first occurrence of any stop string."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
  return text[:cut]
