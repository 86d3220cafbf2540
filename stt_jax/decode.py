"""Batched, sharded decoding: one jitted prefill + `lax.while_loop` per (batch, prompt) bucket.

Prompts are left padded into length buckets (multiples of 32, then powers of two) and
fixed-size batches, so a long list compiles a handful of programs (each logged once). Inside one compiled call the whole
prompt batch is prefilled into a preallocated KV cache and new tokens are produced on device
until every row has stopped (EOS, a stop token/sequence, or `max_new_tokens`). Stop strings
are detected on device by token (any token whose text contains the stop string, and the stop
string's own token sequence) and trimmed exactly on the host from the decoded text.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
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
  """Token-level stop conditions, prepared once per tokenizer and stop strings.

  token_mask: [vocab] bool, tokens that end a row (EOS ids and tokens containing a stop string).
  sequences: [n, width] int32, right-aligned token sequences that end a row (padding -1).
  """

  token_mask: np.ndarray
  sequences: np.ndarray
  eos_ids: tuple[int, ...] = ()

  @classmethod
  def build(cls, vocab_size: int, eos_ids: Sequence[int] = (), stop_token_ids=(),
            stop_sequences: Sequence[Sequence[int]] = ()) -> StopCriteria:
    mask = np.zeros(vocab_size, np.bool_)
    for t in list(eos_ids) + list(stop_token_ids):
      if 0 <= t < vocab_size:
        mask[t] = True
    seqs = [list(s) for s in stop_sequences if len(s) > 1]
    width = max((len(s) for s in seqs), default=1)
    arr = np.full((max(len(seqs), 1), width), _PAD, np.int32)
    for i, s in enumerate(seqs):
      arr[i, width - len(s):] = s
    return cls(token_mask=mask, sequences=arr, eos_ids=tuple(int(t) for t in eos_ids))


def bucket_length(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
  """Padded length for n tokens: multiples of 32 up to 256 (short prompts waste little),
  powers of two above; at most ~12 distinct lengths up to 4k, so few compilations."""
  if n <= minimum:
    return minimum
  if n <= 256:
    return -(-n // 32) * 32
  return 1 << math.ceil(math.log2(n))


def _select(logits: jax.Array, key: jax.Array, temperature, top_p, *, greedy: bool,
            top_k: int) -> jax.Array:
  """Next token from float32 logits [B, V]."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
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
  logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k"))
def _decode_batch(graphdef, state, prefix, prefix_mask, ids, mask, key, temperature, top_p,
                  stop_mask, stop_seqs, *, max_new_tokens: int, greedy: bool, top_k: int):
  """Prefill `prefix` [1, C] once and `ids` [B, P] (left padded) after it, then decode up to
  `max_new_tokens` on device. A shared few-shot prefix is computed once, not B times; C = 0
  means no shared prefix.

  Returns (tokens [B, max_new_tokens] with -1 after a row stopped, lengths [B]).
  """
  model: CausalLM = nnx.merge(graphdef, state)
  b, p = ids.shape
  c = prefix.shape[1]
  select = functools.partial(_select, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k)
  total = c + p + max_new_tokens
  offset = jnp.sum(prefix_mask, dtype=jnp.int32)
  if c:
    one = KVCache.zeros(model.config, 1, total, model.dtype)
    _, one = model.forward_cached(prefix, prefix_mask, positions_from_mask(prefix_mask), one,
                                  last_only=True)
    cache = KVCache(
        k=sharding.constrain(jnp.repeat(one.k, b, axis=1), model.mesh, KV_CACHE_AXES),
        v=sharding.constrain(jnp.repeat(one.v, b, axis=1), model.mesh, KV_CACHE_AXES),
        valid=jnp.repeat(one.valid, b, axis=0), index=one.index)
  else:
    cache = KVCache.zeros(model.config, b, total, model.dtype, model.mesh)
  logits, cache = model.forward_cached(ids, mask, offset + positions_from_mask(mask), cache,
                                       last_only=True)
  first = select(logits[:, -1], jax.random.fold_in(key, 0))
  width = stop_seqs.shape[1]

  def cond(carry):
    step, _, _, _, done, _, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, tok, cache, out, done, lengths, pos, recent = carry
    out = out.at[:, step].set(jnp.where(done, _PAD, tok))
    recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
    seq_hit = jnp.all((recent[:, None, :] == stop_seqs[None]) | (stop_seqs[None] == _PAD), -1)
    seq_hit &= jnp.any(stop_seqs != _PAD, axis=-1)[None]
    stop = stop_mask[tok] | jnp.any(seq_hit, axis=-1)
    lengths = jnp.where(done, lengths, step + 1)
    done = done | stop
    logits, cache = model.forward_cached(tok[:, None], jnp.ones((b, 1), jnp.bool_),
                                         pos[:, None], cache)
    nxt = select(logits[:, 0], jax.random.fold_in(key, step + 1))
    return step + 1, nxt, cache, out, done, lengths, pos + 1, recent

  out = jnp.full((b, max_new_tokens), _PAD, jnp.int32)
  done = ~jnp.any(mask, axis=-1)  # Batch-filler rows are done from the start.
  lengths = jnp.zeros((b,), jnp.int32)
  pos = offset + jnp.sum(mask, axis=-1).astype(jnp.int32)
  recent = jnp.full((b, width), _PAD, jnp.int32)
  carry = (jnp.int32(0), first, cache, out, done, lengths, pos, recent)
  _, _, _, out, _, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
  return out, lengths


class Decoder:
  """Decodes token-id prompts with a model; keeps its compiled buckets across calls."""

  def __init__(self, model: CausalLM, batch_size: int = 8, mesh=None, max_len: int | None = None,
               share_prefix: bool = True):
    self.model = model
    self.share_prefix = share_prefix
    self.mesh = mesh if mesh is not None else model.mesh
    self.batch_size = batch_size
    if self.mesh is not None:  # Batch rows are split over data (and fsdp) axes.
      split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      self.batch_size = -(-batch_size // split) * split
    self.max_len = max_len or model.config.max_position_embeddings
    self.graphdef, self.state = nnx.split(model)
    self.compiled: set[tuple[int, int, int, bool, int]] = set()

  def check_lengths(self, prompts: list[list[int]], max_new_tokens: int,
                    truncate: str = "error") -> list[list[int]]:
    """Applies the context-length policy: 'error' (default) or 'left' (keep the last tokens)."""
    limit = self.max_len - max_new_tokens
    if limit <= 0:
      raise DecodeError(f"max_new_tokens={max_new_tokens} leaves no room in the model's "
                        f"context of {self.max_len} tokens")
    out = []
    for i, p in enumerate(prompts):
      if len(p) > limit:
        if truncate == "left":
          p = p[-limit:]
        elif truncate == "error":
          raise DecodeError(
              f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
              f"the model's context of {self.max_len}. Shorten it or pass truncate='left' to "
              "keep its last tokens")
        else:
          raise DecodeError(f"truncate={truncate!r}; use 'error' or 'left'")
      out.append(list(p))
    return out

  def shared_prefix_len(self, prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with (each keeps at least one of its own), if worth sharing."""
    real = [p for p in prompts if p]
    if len(real) < 2 or not self.share_prefix:
      return 0
    first, n = real[0], min(len(p) for p in real) - 1
    for p in real[1:]:
      k = 0
      limit = min(n, len(p))
      while k < limit and p[k] == first[k]:
        k += 1
      n = k
    return n if n >= MIN_SHARED_PREFIX else 0

  def run_batch(self, prompts: list[list[int]], max_new_tokens: int, stop: StopCriteria,
                sampling: Sampling, batch_index: int = 0) -> list[list[int]]:
    """Decodes up to `batch_size` prompts; returns generated ids per prompt (stop token kept)."""
    n = len(prompts)
    b = self.batch_size if n <= self.batch_size else n
    shared = self.shared_prefix_len(prompts)
    prefix = np.zeros((1, bucket_length(shared) if shared else 0), np.int32)
    prefix_mask = np.zeros(prefix.shape, np.bool_)
    if shared:
      prefix[0, -shared:] = prompts[0][:shared]
      prefix_mask[0, -shared:] = True
    prompts = [p[shared:] for p in prompts]
    longest = max(len(p) for p in prompts)
    p_len = min(bucket_length(longest), self.max_len - max_new_tokens - prefix.shape[1])
    p_len = max(p_len, longest)
    ids = np.zeros((b, p_len), np.int32)
    mask = np.zeros((b, p_len), np.bool_)
    for r, p in enumerate(prompts):
      if p:
        ids[r, p_len - len(p):] = p
        mask[r, p_len - len(p):] = True
    key = (b, prefix.shape[1], p_len, max_new_tokens, sampling.greedy, sampling.top_k)
    if key not in self.compiled:
      self.compiled.add(key)
      logging.info("decode: compiling bucket batch=%d shared_prefix=%d prompt_len=%d max_new=%d "
                   "(%d buckets so far)", b, prefix.shape[1], p_len, max_new_tokens,
                   len(self.compiled))
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    if self.mesh is not None:
      spec = sharding.named_sharding(self.mesh, ("batch", None), ids.shape)
      ids_j, mask_j = jax.device_put(ids_j, spec), jax.device_put(mask_j, spec)
    rng = jax.random.fold_in(jax.random.PRNGKey(sampling.seed), batch_index)
    out, lengths = _decode_batch(
        self.graphdef, self.state, jnp.asarray(prefix), jnp.asarray(prefix_mask), ids_j, mask_j,
        rng,
        jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p),
        jnp.asarray(stop.token_mask), jnp.asarray(stop.sequences),
        max_new_tokens=max_new_tokens, greedy=sampling.greedy, top_k=sampling.top_k)
    out, lengths = np.asarray(out), np.asarray(lengths)
    results = []
    for r in range(n):
      m = int(lengths[r]) if lengths[r] else max_new_tokens
      results.append([int(t) for t in out[r, :m] if t != _PAD])
    return results

  def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stop: StopCriteria, sampling: Sampling = Sampling(),
                   truncate: str = "error", progress: bool = False,
                   desc: str = "decode") -> Iterator[tuple[int, list[int]]]:
    """Yields (prompt index, generated ids) batch by batch, longest prompts first."""
    prompts = self.check_lengths([list(p) for p in prompts], max_new_tokens, truncate)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    bar = tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress,
               dynamic_ncols=True)
    start, produced = time.perf_counter(), 0
    try:
      for k in range(0, len(order), self.batch_size):
        chunk = order[k:k + self.batch_size]
        outs = self.run_batch([prompts[i] for i in chunk], max_new_tokens, stop, sampling,
                              batch_index=k // self.batch_size)
        for i, o in zip(chunk, outs):
          produced += len(o)
          yield i, o
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{produced / max(time.perf_counter() - start, 1e-9):.1f}")
    finally:
      bar.close()


# ------------------------------------------------------------------------------ text API


@functools.lru_cache(maxsize=8)
def _tokens_containing(tokenizer, stops: tuple[str, ...]) -> tuple[int, ...]:
  """Ids of every vocabulary token whose decoded text contains one of `stops`."""
  if not stops:
    return ()
  vocab = len(tokenizer)
  texts = tokenizer.batch_decode([[i] for i in range(vocab)], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
  return tuple(i for i, t in enumerate(texts) if any(s in t for s in stops))


def stop_criteria(tokenizer, config, stop: Sequence[str] = ("\n",),
                  eos: bool = True) -> StopCriteria:
  """Stop tokens/sequences for `stop` strings plus the model's and tokenizer's EOS ids."""
  stops = tuple(s for s in stop if s)
  eos_ids = set(config.eos_token_id) if eos else set()
  if eos and tokenizer.eos_token_id is not None:
    eos_ids.add(int(tokenizer.eos_token_id))
  seqs = [tokenizer.encode(s, add_special_tokens=False) for s in stops]
  return StopCriteria.build(max(config.vocab_size, len(tokenizer)), sorted(eos_ids),
                            _tokens_containing(tokenizer, stops), seqs)


def trim_text(text: str, stop: Sequence[str]) -> str:
  """Cuts `text` at the first occurrence of any stop string."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
  return text[:cut]


def generate_stream(model: CausalLM, tokenizer, prompts: Sequence[str], *,
                    max_new_tokens: int = 64, stop: Sequence[str] = ("\n",),
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int = 0, batch_size: int = 8, mesh=None, truncate: str = "error",
                    add_special_tokens: bool = True, progress: bool = True,
                    decoder: Decoder | None = None, desc: str = "decode"
                    ) -> Iterator[tuple[int, str]]:
  """Yields (prompt index, completion text) over a long list, with a tqdm bar (items/s,
  tokens/s, ETA). Completions exclude the prompt, EOS and anything from a stop string on."""
  decoder = decoder or Decoder(model, batch_size=batch_size, mesh=mesh)
  ids = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
  criteria = stop_criteria(tokenizer, model.config, stop)
  sampling = Sampling(temperature, top_k, top_p, seed)
  for i, out in decoder.generate_ids(ids, max_new_tokens, criteria, sampling, truncate,
                                     progress=progress, desc=desc):
    if out and out[-1] in criteria.eos_ids:
      out = out[:-1]
    text = tokenizer.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    yield i, trim_text(text, stop)


def generate(model: CausalLM, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
             stop: Sequence[str] = ("\n",), temperature: float = 0.0,
             batch_size: int = 8, mesh=None, **kwargs) -> list[str]:
  """Completions for `prompts`, in order. See `generate_stream` for the options."""
  kwargs.setdefault("progress", False)
  out: list[str] = [""] * len(prompts)
  for i, text in generate_stream(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 stop=stop, temperature=temperature, batch_size=batch_size,
                                 mesh=mesh, **kwargs):
    out[i] = text
  return out


def generate_tokens(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                    eos_ids: Sequence[int] | None = None, stop_token_ids: Sequence[int] = (),
                    stop_sequences: Sequence[Sequence[int]] = (), temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                    mesh=None, truncate: str = "error") -> list[list[int]]:
  """Token-level variant: generated ids per prompt (a final EOS/stop token is kept)."""
  eos_ids = model.config.eos_token_id if eos_ids is None else eos_ids
  criteria = StopCriteria.build(model.config.vocab_size, eos_ids, stop_token_ids, stop_sequences)
  decoder = Decoder(model, batch_size=batch_size, mesh=mesh)
  out: list[list[int]] = [[] for _ in prompts]
  for i, ids in decoder.generate_ids(prompts, max_new_tokens, criteria,
                                     Sampling(temperature, top_k, top_p, seed), truncate):
    out[i] = ids
  return out
