"""Continuous batching: a fixed number of slots, each refilled with the next prompt as soon as
its sequence ends, so no slot idles while a batch waits for its slowest row.

Three compiled programs serve a whole stage (each keyed by shapes that stay put):
- `_prefix_program`: the few-shot prefix every prompt shares, prefilled once and stored once
  ([layers, 1, K, C, D]), not repeated per slot.
- `_prefill_program`: `prefill_chunk` tokens of new prompts packed end to end (no padding
  per prompt; a long prompt spans calls), each written into its slot; a prompt whose last
  token is in the call gets its first token, and its slot's stop state is reset.
- `_decode_program`: up to `steps_per_call` decode steps of every slot, ending early once
  enough slots are idle for the waiting prompts to fill a prefill call; returns the tokens
  made and which rows ended.

The host loop in `Engine.generate` orders prompts longest first, refills free slots, runs the
decode program and yields each finished sequence with its index, in any order. Every row has
its own token budget. Sampling keys are per prompt (`fold_in(seed, prompt index)`, then the
token's index), so sampled text does not depend on which slot or call a prompt lands in.
Greedy output is the same tokens as the batch-synchronous `decode.Decoder` and transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from stt_jax import sharding
from stt_jax.decode import (_PAD, DecodeError, Sampling, StopCriteria, bucket_length,
                            fit_context, sampling_logits, shared_prefix_len, stop_step)
from stt_jax.models.decoder import PREFIX_AXES, CausalLM, PrefixCache, SlotCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
  """Per-slot decoding state, on device. tok: the next token to emit (chosen, not yet
  recorded); active: the slot holds an unfinished sequence; count: tokens emitted so far;
  budget: the row's token budget; stopped: the last sequence ended by EOS/stop; recent:
  last tokens (stop sequences); matched: stop-string automaton states; key: per-prompt PRNG
  key data."""

  tok: jax.Array
  active: jax.Array
  count: jax.Array
  budget: jax.Array
  stopped: jax.Array
  recent: jax.Array
  matched: jax.Array
  key: jax.Array

  @classmethod
  def idle(cls, slots: int, stop_width: int, n_stops: int) -> SlotState:
    return cls(tok=jnp.zeros((slots,), jnp.int32), active=jnp.zeros((slots,), jnp.bool_),
               count=jnp.zeros((slots,), jnp.int32), budget=jnp.zeros((slots,), jnp.int32),
               stopped=jnp.zeros((slots,), jnp.bool_),
               recent=jnp.full((slots, stop_width), _PAD, jnp.int32),
               matched=jnp.zeros((slots, n_stops), jnp.int32),
               key=jnp.zeros((slots, 2), jnp.uint32))


def _pick(logits, keys, count, temperature, top_p, *, greedy: bool, top_k: int):
  """Next token of each row from float32 logits [B, V]; row b's key is fold_in(keys[b],
  count[b]) (the token's index in its own sequence)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = sampling_logits(logits, temperature, top_p, top_k)
  row_keys = jax.vmap(jax.random.fold_in)(keys, count)
  return jax.vmap(jax.random.categorical)(row_keys, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "kv_dtype"))
def _prefix_program(graphdef, state, ids, length, *, kv_dtype):
  """The shared prefix's KV in `kv_dtype` (its later tokens read the keys as stored)."""
  model: CausalLM = nnx.merge(graphdef, state)
  return model.prefill_prefix(ids, length, dtype=kv_dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "top_k"),
                   donate_argnames=("cache", "slots"))
def _prefill_program(graphdef, state, cache, slots, prefix, ids, slot, idx, at, final_slot,
                     budget, keys, start_state, temperature, top_p, *, greedy: bool,
                     top_k: int):
  """Writes a packed stream of prompt tokens into their slots (`CausalLM.forward_packed`);
  each prompt whose last token is in the stream (token `at[r]`, slot `final_slot[r]`; a
  filler has slot >= slots) gets its first token and becomes active with `budget`, `keys`."""
  model: CausalLM = nnx.merge(graphdef, state)
  hidden, cache = model.forward_packed(ids, slot, idx, cache, prefix, at)
  logits = model.logits(hidden)[:, 0]
  first = _pick(logits, keys, jnp.zeros_like(at), temperature, top_p, greedy=greedy,
                top_k=top_k)
  r = at.shape[0]
  put = lambda a, v: a.at[final_slot].set(v, mode="drop")  # Fillers write nowhere.
  slots = SlotState(
      tok=put(slots.tok, first), active=put(slots.active, True),
      count=put(slots.count, 0), budget=put(slots.budget, budget),
      stopped=put(slots.stopped, False),
      recent=put(slots.recent, jnp.full((r, slots.recent.shape[1]), _PAD, jnp.int32)),
      matched=put(slots.matched, jnp.full((r, slots.matched.shape[1]), start_state,
                                          jnp.int32)),
      key=put(slots.key, keys))
  return cache, slots


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "greedy", "top_k"),
                   donate_argnames=("cache", "slots"))
def _decode_program(graphdef, state, cache, slots, prefix, stop_mask, stop_seqs, stop_table,
                    temperature, top_p, refill_at, *, steps: int, greedy: bool, top_k: int):
  """Up to `steps` decode steps of every slot, ending early once `refill_at` slots are idle
  (the host has prompts waiting for them). Returns (cache, slots, out [S, steps] with -1
  where a slot made no token, finished [S]: the slot's sequence ended in this call)."""
  model: CausalLM = nnx.merge(graphdef, state)
  n = slots.tok.shape[0]
  ones = jnp.ones((n,), jnp.int32)

  def cond(carry):
    step, _, slots, _, _ = carry
    idle = jnp.sum(~slots.active)
    return (step < steps) & (idle < jnp.minimum(refill_at, n))

  def body(carry):
    step, cache, s, out, finished = carry
    tok, active = s.tok, s.active
    out = out.at[:, step].set(jnp.where(active, tok, _PAD))
    recent, matched, stop = stop_step(tok, s.recent, s.matched, stop_mask, stop_seqs,
                                      stop_table)
    count = s.count + active
    ends = active & (stop | (count >= s.budget))
    still = active & ~ends
    hidden, cache = model.forward_slots(tok[:, None], jnp.where(still, ones, 0), cache, prefix)
    nxt = _pick(model.logits(hidden)[:, 0], s.key, count, temperature, top_p, greedy=greedy,
                top_k=top_k)
    s = SlotState(tok=jnp.where(still, nxt, tok), active=still, count=count, budget=s.budget,
                  stopped=jnp.where(ends, stop, s.stopped),
                  recent=jnp.where(active[:, None], recent, s.recent),
                  matched=jnp.where(active[:, None], matched, s.matched),
                  key=s.key)
    return step + 1, cache, s, out, finished | ends

  out = jnp.full((n, steps), _PAD, jnp.int32)
  carry = (jnp.int32(0), cache, slots, out, jnp.zeros((n,), jnp.bool_))
  _, cache, slots, out, finished = jax.lax.while_loop(cond, body, carry)
  return cache, slots, out, finished


def kv_bytes(config, slots: int, capacity: int, prefix_len: int, dtype) -> int:
  """Bytes of keys + values for `slots` slots of `capacity` tokens plus one `prefix_len`-token
  shared prefix (stored once; with per-slot copies it would count in every slot's capacity)."""
  per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
  return per_token * np.dtype(dtype).itemsize * (slots * capacity + prefix_len)


@dataclasses.dataclass
class EngineStats:
  """Counters of one `generate` call: device steps x slots is the slot capacity used."""

  prompts: int = 0
  tokens: int = 0          # useful generated tokens (the final EOS/stop token included)
  decode_calls: int = 0
  device_steps: int = 0
  prefill_calls: int = 0
  seconds: float = 0.0

  def slot_use(self, slots: int) -> float:
    return self.tokens / max(1, slots * self.device_steps)


class Engine:
  """Continuous-batching generation over a model; keeps its compiled programs across calls.

  slots: sequences decoded at once (rounded up to a multiple of the mesh's batch split);
  steps_per_call: most decode steps per device call (the host refills slots between calls);
  prefill_chunk: prompt tokens per prefill call, several prompts packed end to end (rounded
  up to a multiple of the batch split); refill_rows: while prompts wait, a decode call ends
  once enough slots are idle for the next prompts to fill a prefill call, but never waits
  for more than `refill_rows` (default slots // 2); kv_dtype: the slot and prefix caches'
  dtype (default the model's compute dtype; keys and values are rounded to it when written).
  """

  def __init__(self, model: CausalLM, slots: int = 8, mesh=None, steps_per_call: int = 16,
               prefill_chunk: int = 128, refill_rows: int | None = None,
               max_len: int | None = None, share_prefix: bool = True, kv_dtype=None):
    self.model = model
    self.kv_dtype = jnp.dtype(kv_dtype or model.dtype)
    self.mesh = mesh if mesh is not None else model.mesh
    split = 1
    if self.mesh is not None:
      split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.split = split
    self.slots = -(-slots // split) * split
    self.refill_rows = refill_rows or max(1, self.slots // 2)
    self.refill_rows = min(self.refill_rows, self.slots)
    self.steps_per_call = steps_per_call
    self.prefill_chunk = -(-prefill_chunk // split) * split
    self.share_prefix = share_prefix
    self.max_len = max_len or model.config.max_position_embeddings
    self.graphdef, self.state = nnx.split(model)
    self.compiled: set[tuple] = set()
    self.capacity = 0   # Slot length and prefix length only grow, so later calls reuse
    self.prefix_len = 0  # the programs compiled for earlier ones.
    self.stats = EngineStats()

  # ---------------------------------------------------------------- host-side planning

  def check_lengths(self, prompts: list[list[int]], budgets: list[int],
                    truncate: str = "error") -> list[list[int]]:
    """The context-length policy per row: 'error' (default) or 'left' (keep the last tokens)."""
    return [fit_context(p, i, b, self.max_len, truncate)
            for i, (p, b) in enumerate(zip(prompts, budgets))]

  def _note_compile(self, name: str, key: tuple) -> None:
    if (name, key) not in self.compiled:
      self.compiled.add((name, key))
      logging.info("engine: compiling %s %s (%d programs so far)", name, key, len(self.compiled))

  def _place(self, x: np.ndarray, logical) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, sharding.named_sharding(self.mesh, logical, x.shape,
                                                     layout="inference"))

  def _prefix(self, tokens: list[int]) -> PrefixCache:
    cfg = self.model.config
    # Multiples of 128 (8 without a prefix): the padded keys are masked but still read.
    self.prefix_len = max(self.prefix_len, -(-len(tokens) // 128) * 128 if tokens else 8)
    c = self.prefix_len
    if not tokens:
      shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, c, cfg.head_dim)
      zeros = sharding.constrain(jnp.zeros(shape, self.kv_dtype), self.mesh, PREFIX_AXES)
      return PrefixCache(k=zeros, v=zeros, length=jnp.int32(0))
    ids = np.zeros((1, c), np.int32)
    ids[0, :len(tokens)] = tokens
    self._note_compile("prefix", (c,))
    return _prefix_program(self.graphdef, self.state, jnp.asarray(ids), jnp.int32(len(tokens)),
                           kv_dtype=self.kv_dtype)

  # ---------------------------------------------------------------- the loop

  def generate(self, prompts: Sequence[Sequence[int]], budgets: int | Sequence[int],
               stop: StopCriteria, sampling: Sampling = Sampling(), truncate: str = "error",
               progress: bool = False, desc: str = "decode"
               ) -> Iterator[tuple[int, list[int], bool]]:
    """Yields (prompt index, generated ids, stopped) as sequences finish, in any order.

    budgets: the token budget of every prompt (one int for all). stopped is False when the
    row used its whole budget without EOS or a stop. Generated ids keep a final EOS/stop.
    """
    n = len(prompts)
    budgets = [int(budgets)] * n if isinstance(budgets, (int, np.integer)) else list(budgets)
    if len(budgets) != n:
      raise DecodeError(f"{len(budgets)} budgets for {n} prompts")
    if any(b < 1 for b in budgets):
      raise DecodeError("every max_new_tokens must be >= 1")
    if not n:
      return
    prompts = self.check_lengths([list(p) for p in prompts], budgets, truncate)
    shared = shared_prefix_len(prompts) if self.share_prefix else 0
    suffixes = [p[shared:] for p in prompts]
    if any(not s for s in suffixes):
      raise DecodeError("empty prompt: every prompt needs at least one token")
    self.capacity = max(self.capacity, bucket_length(
        max(len(s) + b for s, b in zip(suffixes, budgets)), 32))
    prefix = self._prefix(prompts[0][:shared])
    cfg = self.model.config
    cache = SlotCache.zeros(cfg, self.slots, self.capacity, self.kv_dtype, self.mesh)
    n_stops, n_states = stop.table.shape[:2]
    slots = SlotState.idle(self.slots, stop.sequences.shape[1], n_stops)
    consts = dict(stop_mask=jnp.asarray(stop.token_mask), stop_seqs=jnp.asarray(stop.sequences),
                  stop_table=jnp.asarray(stop.table))
    temperature = jnp.float32(max(sampling.temperature, 1e-6))
    top_p = jnp.float32(sampling.top_p)
    mode = dict(greedy=sampling.greedy, top_k=sampling.top_k)
    base_key = jax.random.PRNGKey(sampling.seed)  # Raw uint32[2] keys, one per prompt.
    keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(base_key, i))(jnp.arange(n)))

    queue = sorted(range(n), key=lambda i: -len(suffixes[i]))[::-1]  # pop() = longest first
    owner = [-1] * self.slots
    made: list[list[int]] = [[] for _ in range(self.slots)]
    stats = self.stats = EngineStats(prompts=n)  # Live: callers show it while iterating.
    start = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    try:
      while queue or any(o >= 0 for o in owner):
        free = [s for s in range(self.slots) if owner[s] < 0]
        group = []
        while free and queue:
          group.append((free.pop(0), queue.pop()))
        if group:
          cache, slots = self._refill(group, suffixes, budgets, keys, n_states, cache, slots,
                                      prefix, temperature, top_p, mode, stats)
          for s, i in group:
            owner[s], made[s] = i, []
        refill_at = self._refill_at([len(suffixes[i]) for i in queue[-self.slots:]])
        self._note_compile("decode", (self.slots, self.capacity, self.prefix_len,
                                      self.steps_per_call, stop.table.shape, *mode.values()))
        cache, slots, out, finished = _decode_program(
            self.graphdef, self.state, cache, slots, prefix, temperature=temperature,
            top_p=top_p, refill_at=jnp.int32(refill_at), steps=self.steps_per_call, **consts,
            **mode)
        out, finished = np.asarray(out), np.asarray(finished)
        stopped = np.asarray(slots.stopped)
        stats.decode_calls += 1
        stats.device_steps += int(np.max(np.sum(out != _PAD, axis=1), initial=0))
        done = 0
        new_tokens = 0
        for s in range(self.slots):
          if owner[s] < 0:
            continue
          toks = [int(t) for t in out[s] if t != _PAD]
          made[s].extend(toks)
          new_tokens += len(toks)
          if finished[s]:
            yield owner[s], made[s], bool(stopped[s])
            owner[s] = -1
            done += 1
        stats.tokens += new_tokens
        stats.seconds = time.perf_counter() - start
        bar.update(done)
        bar.set_postfix(tok_s=f"{stats.tokens / max(stats.seconds, 1e-9):.1f}",
                        slot_use=f"{stats.slot_use(self.slots):.0%}")
    finally:
      bar.close()

  def _refill_at(self, waiting: list[int]) -> int:
    """How many idle slots end a decode call, given the suffix lengths of the next prompts
    (popped from the end): enough to fill one prefill call, so prefill computes few filler
    tokens, but at most `refill_rows`, so slots do not idle long. No prompts waiting: all."""
    if not waiting:
      return self.slots
    tokens, m = 0, 0
    for n in reversed(waiting):
      tokens, m = tokens + n, m + 1
      if tokens >= self.prefill_chunk:
        break
    return max(1, min(m, self.refill_rows))

  def _refill(self, group, suffixes, budgets, keys, n_states, cache, slots, prefix,
              temperature, top_p, mode, stats):
    """Prefills the prompts of `group` [(slot, prompt index)] into their slots: their tokens
    packed end to end in one stream per data-parallel shard, `prefill_chunk` tokens per call
    in all (a long prompt continues in the next call)."""
    b = self.split
    l, r = self.prefill_chunk // b, self.slots
    streams: list[list[tuple[int, int, int]]] = [[] for _ in range(b)]
    for s, i in sorted(group, key=lambda g: -len(suffixes[g[1]])):  # Balance the shards.
      row = min(streams, key=len)
      row.extend((s, i, j) for j in range(len(suffixes[i])))
    for c in range(0, max(map(len, streams)), l):
      ids = np.zeros((b, l), np.int32)
      slot = np.full((b, l), self.slots, np.int32)  # Fillers write nowhere.
      idx = np.zeros((b, l), np.int32)
      at = np.zeros((r,), np.int32)
      final_slot = np.full((r,), self.slots, np.int32)
      budget = np.ones((r,), np.int32)
      row_keys = np.zeros((r, 2), np.uint32)
      k = 0
      for row, stream in enumerate(streams):
        for t, (s, i, j) in enumerate(stream[c:c + l]):
          ids[row, t], slot[row, t], idx[row, t] = suffixes[i][j], s, j
          if j == len(suffixes[i]) - 1:  # The prompt's last token: its first output follows.
            at[k], final_slot[k], budget[k], row_keys[k] = row * l + t, s, budgets[i], keys[i]
            k += 1
      self._note_compile("prefill", (b, l, r, self.capacity, self.prefix_len, *mode.values()))
      put = lambda x: self._place(x, ("batch", None))
      cache, slots = _prefill_program(
          self.graphdef, self.state, cache, slots, prefix, put(ids), put(slot), put(idx),
          jnp.asarray(at), jnp.asarray(final_slot), jnp.asarray(budget), jnp.asarray(row_keys),
          jnp.int32(n_states - 1), temperature, top_p, **mode)
      stats.prefill_calls += 1
    return cache, slots
