"""One NNX decoder for Llama 2/3/3.1, Mistral, Qwen2/2.5, Gemma 2 and Gemma 3 (text).

The families differ only in ModelConfig switches read here: Gemma's sqrt(hidden) embedding
scale, (1 + w) RMSNorm, the norms after attention and around the MLP (`sandwich_norms`),
GeGLU, q/k norms, query_pre_attn_scalar, attention and final logit soft-caps, and a RoPE table
per layer type (sliding layers' local base); sliding windows are per layer for every family.

Parameter names and the module tree mirror Hugging Face (`model.layers.N.self_attn.q_proj`),
so loading is renames plus transposes (see hf_io.py). With `scan_layers` (the default) the
layers are one `DecoderLayer` whose every parameter has a leading `layers` dimension
(`model.layers.self_attn.q_proj.kernel`: [layers, in, out]) and the forward passes run it
under `jax.lax.scan`, so XLA compiles one layer instead of num_hidden_layers copies; hf_io
maps row i to the HF names `model.layers.{i}.*` at the load/save boundary. Every weight
carries logical axis names (`logical_axes` metadata) that `stt_jax.sharding` resolves onto the mesh; activations are
constrained the same way. Norms, softmax and logits are computed in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from stt_jax import sharding
from stt_jax.models import attention as attention_lib
from stt_jax.models import lora
from stt_jax.models.config import ModelConfig

_NEG = attention_lib.NEG


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Preallocated keys/values of every layer, written in place at a shared slot `index`.

  k, v: [layers, batch, kv_heads, max_len, head_dim] (the layout the attention dots read
  without transposes); valid: [batch, max_len] marks slots that
  hold real (non-padding) tokens; index: next slot to write (scalar int32). Prompts are left
  padded so one `dynamic_update_slice` at `index` serves the whole batch.
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32,
            mesh: Mesh | None = None) -> KVCache:
    k, v = kv_zeros(config, batch, max_len, dtype, mesh)
    valid = sharding.constrain(jnp.zeros((batch, max_len), jnp.bool_), mesh, ("batch", None))
    return cls(k=k, v=v, valid=valid, index=jnp.zeros((), jnp.int32))


KV_CACHE_AXES = (None, "batch", "act_kv_heads", "cache_length", None)


def kv_zeros(config: ModelConfig, rows: int, length: int, dtype=jnp.float32,
             mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """Zero keys and values [layers, rows, kv_heads, length, head_dim], sharded as a cache."""
  shape = (config.num_hidden_layers, rows, config.num_key_value_heads, length, config.head_dim)
  return (sharding.constrain(jnp.zeros(shape, dtype), mesh, KV_CACHE_AXES),
          sharding.constrain(jnp.zeros(shape, dtype), mesh, KV_CACHE_AXES))
PREFIX_AXES = (None, None, "act_kv_heads", None, None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotCache:
  """The KV of continuous batching: one row ("slot") per sequence being decoded, each at its
  own length, so a finished slot is refilled with a new prompt while the others go on.

  k, v: [layers, slots, K, T, D]; lengths: [slots] int32, tokens stored in each slot
  (entries [0, length) are its sequence; later entries are stale and masked). Positions
  continue after the shared prefix (a `PrefixCache`), which is stored once, not per slot.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @classmethod
  def zeros(cls, config: ModelConfig, slots: int, capacity: int, dtype=jnp.float32,
            mesh: Mesh | None = None) -> SlotCache:
    k, v = kv_zeros(config, slots, capacity, dtype, mesh)
    return cls(k=k, v=v, lengths=jnp.zeros((slots,), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixCache:
  """KV of a few-shot prefix every prompt shares: k, v [layers, 1, K, C, D], right padded;
  length: real prefix tokens (scalar int32; 0 = no prefix)."""

  k: jax.Array
  v: jax.Array
  length: jax.Array


@dataclasses.dataclass
class SlotView:
  """What one layer's `Attention.with_slots` needs: the full slot caches; where each new
  token [B, L] is written (`write_rows` [B, L] slots, None = row b is slot b; `idx` [B, L]
  slot-local); which cache rows the batch reads (`rows` [B]; None = every slot, in order);
  whether queries also read the new tokens' own keys (`self_keys`: a packed prefill, whose
  prompts sit in different slots); the layer's prefix KV; and the visibility mask
  [B, L, C + T (+ L with self_keys)]."""

  k_all: jax.Array
  v_all: jax.Array
  layer: int
  rows: jax.Array | None
  idx: jax.Array
  prefix_k: jax.Array
  prefix_v: jax.Array
  mask: jax.Array
  write_rows: jax.Array | None = None
  self_keys: bool = False

  def write(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatters k, v [B, K, L, D] at (layer, slot, :, idx); indices past the cache (a
    filler token, slot >= slots) are dropped."""
    rows = self.write_rows
    if rows is None:
      rows = (jnp.arange(k.shape[0]) if self.rows is None else self.rows)[:, None]
    at = (self.layer, rows, slice(None), self.idx, slice(None))
    k_all = self.k_all.at[at].set(k.transpose(0, 2, 1, 3).astype(self.k_all.dtype), mode="drop")
    v_all = self.v_all.at[at].set(v.transpose(0, 2, 1, 3).astype(self.v_all.dtype), mode="drop")
    return k_all, v_all

  def read(self, k_all: jax.Array, v_all: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.rows is None:
      return k_all[self.layer], v_all[self.layer]
    return (jnp.take(k_all[self.layer], self.rows, axis=0, mode="clip"),
            jnp.take(v_all[self.layer], self.rows, axis=0, mode="clip"))

  def prefix_kv(self) -> tuple[jax.Array, jax.Array]:
    return self.prefix_k[self.layer, 0], self.prefix_v[self.layer, 0]


def _linear(cfg_in: int, cfg_out: int, axes: tuple[str, str], bias: bool, dtype, param_dtype,
            rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      cfg_in, cfg_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
      kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[1:]})


class RMSNorm(nnx.Module):
  """HF Llama RMSNorm: normalise in float32, cast back, then scale. With `unit_offset`
  (Gemma) the weight is stored as w and scales by (1 + w), in float32 before the cast."""

  def __init__(self, dim: int, eps: float, *, param_dtype, unit_offset: bool = False):
    init = jnp.zeros if unit_offset else jnp.ones
    self.weight = nnx.Param(init((dim,), param_dtype), logical_axes=("norm",))
    self.eps = eps
    self.unit_offset = unit_offset

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.unit_offset:
      return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(dtype)
    return self.weight[...].astype(dtype) * x32.astype(dtype)


def _norm(config: ModelConfig, dim: int, param_dtype) -> RMSNorm:
  return RMSNorm(dim, config.rms_norm_eps, param_dtype=param_dtype,
                 unit_offset=config.norm_unit_offset)


def rope_cos_sin(inv_freq: np.ndarray, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [batch, length, head_dim] for explicit per-token positions."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Half-split ("rotate_half") RoPE as in HF; x: [batch, length, heads, head_dim]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
  """Grouped-query attention with RoPE and an optional in-place KV cache."""

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, mesh, rngs):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = (
        c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    args = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = _linear(c.hidden_size, q_dim, ("embed", "heads"), c.qkv_bias, **args)
    self.k_proj = _linear(c.hidden_size, kv_dim, ("embed", "kv_heads"), c.qkv_bias, **args)
    self.v_proj = _linear(c.hidden_size, kv_dim, ("embed", "kv_heads"), c.qkv_bias, **args)
    self.o_proj = _linear(q_dim, c.hidden_size, ("heads", "embed"), c.o_bias, **args)
    if c.qk_norm:  # Gemma 3: RMSNorm over each head's vector, before RoPE.
      self.q_norm = _norm(c, c.head_dim, param_dtype)
      self.k_norm = _norm(c, c.head_dim, param_dtype)
    self.qk_norm = c.qk_norm
    self.scale = c.attn_scale
    self.soft_cap = c.attn_logit_softcapping
    self.dtype = dtype
    self.mesh = mesh

  def project(self, x, cos, sin):
    """q [B, L, H, D], k and v [B, K, L, D]: the projections with RoPE applied."""
    b, l, _ = x.shape
    q = self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = sharding.constrain(apply_rope(q, cos, sin), self.mesh,
                           ("batch", "length", "act_heads", None))
    k = sharding.constrain(apply_rope(k, cos, sin), self.mesh,
                           ("batch", "length", "act_kv_heads", None))
    v = sharding.constrain(v, self.mesh, ("batch", "length", "act_kv_heads", None))
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def output(self, out):
    """o_proj of the attention output [B, L, H * D]."""
    out = sharding.constrain(out, self.mesh, ("batch", "length", "act_heads"))
    return self.o_proj(out)

  def __call__(self, x, cos, sin, mask, cache=None):
    """x: [B, L, E]; mask: [B, 1, L, S] bool (the dense reference), or for a full-sequence
    forward without cache an `attention.Segments` (the kernel `model.attention` chose).

    cache: optional (k_all, v_all, layer, index) with k_all/v_all [layers, B, K, S, D]; the new
    keys/values are written in place at slot `index` of `layer` and attention reads that
    layer's whole cache. Returns (output, updated (k_all, v_all) or None).
    """
    b, l, _ = x.shape
    q, k, v = self.project(x, cos, sin)
    if isinstance(mask, attention_lib.Segments):
      out = attention_lib.causal(q, k, v, mask, mesh=self.mesh, soft_cap=self.soft_cap,
                                 scale=self.scale)
      return self.output(out.reshape(b, l, self.num_heads * self.head_dim)), None
    new_cache = None
    if cache is not None:
      k_all, v_all, layer, index = cache
      at = (layer, 0, 0, index, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
      v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
      new_cache = (k_all, v_all)
      k, v = k_all[layer].astype(self.dtype), v_all[layer].astype(self.dtype)
    out = attention_lib.dense(q, k, v, mask, soft_cap=self.soft_cap, scale=self.scale)
    out = out.reshape(b, l, self.num_heads * self.head_dim)
    return self.output(out), new_cache

  def with_slots(self, x, cos, sin, view: SlotView):
    """Continuous-batching attention: x [B, L, E] are each row's next tokens, appended to its
    slot's cache at that slot's own length; queries read the shared prefix (stored once,
    [1, K, C, D]) and their slot's cache. Returns (output, updated (k_all, v_all))."""
    b, l, _ = x.shape
    q, k, v = self.project(x, cos, sin)
    k_all, v_all = view.write(k, v)
    k_rows, v_rows = view.read(k_all, v_all)
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, l, self.num_kv_heads, groups, self.head_dim)
    pk, pv = view.prefix_kv()
    per_row = [(k_rows, v_rows)]
    if view.self_keys:  # As stored: rounded to the cache's dtype, as a later read sees them.
      per_row.append((k.astype(k_all.dtype), v.astype(v_all.dtype)))
    scores = [jnp.einsum("blkgd,ksd->bkgls", q, pk.astype(self.dtype),
                         preferred_element_type=jnp.float32)]
    scores += [jnp.einsum("blkgd,bksd->bkgls", q, kr.astype(self.dtype),
                          preferred_element_type=jnp.float32) for kr, _ in per_row]
    scores = attention_lib.cap_scores(jnp.concatenate(scores, axis=-1) * self.scale,
                                      self.soft_cap)
    scores = jnp.where(view.mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    c = pk.shape[1]
    out = jnp.einsum("bkgls,ksd->blkgd", probs[..., :c], pv.astype(self.dtype))
    for kr, vr in per_row:
      t = kr.shape[2]
      out = out + jnp.einsum("bkgls,bksd->blkgd", probs[..., c:c + t], vr.astype(self.dtype))
      c += t
    return self.output(out.reshape(b, l, self.num_heads * self.head_dim)), (k_all, v_all)


class MLP(nnx.Module):
  """Gated feed-forward: down(act(gate(x)) * up(x)); act silu (SwiGLU) or tanh-approximated
  gelu (Gemma's GeGLU, `gelu_pytorch_tanh`)."""

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, mesh, rngs):
    c = config
    args = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = _linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), c.mlp_bias,
                             **args)
    self.up_proj = _linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), c.mlp_bias,
                           **args)
    self.down_proj = _linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), c.mlp_bias,
                             **args)
    self.gelu = c.hidden_act == "gelu_pytorch_tanh"
    self.mesh = mesh

  def __call__(self, x):
    gate = self.gate_proj(x)
    gate = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
    h = gate * self.up_proj(x)
    h = sharding.constrain(h, self.mesh, ("batch", "length", "act_mlp"))
    return self.down_proj(h)


class DecoderLayer(nnx.Module):
  """Pre-norm residual block. Llama: x + attn(norm(x)), then x + mlp(post_attention(x)).
  With `sandwich_norms` (Gemma) post_attention_layernorm normalises the attention output and
  the MLP has its own pre_ and post_feedforward_layernorm, as the HF names say."""

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, mesh, rngs):
    args = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, rngs=rngs)
    h = config.hidden_size
    self.input_layernorm = _norm(config, h, param_dtype)
    self.self_attn = Attention(config, **args)
    self.post_attention_layernorm = _norm(config, h, param_dtype)
    if config.sandwich_norms:
      self.pre_feedforward_layernorm = _norm(config, h, param_dtype)
      self.post_feedforward_layernorm = _norm(config, h, param_dtype)
    self.sandwich = config.sandwich_norms
    self.mlp = MLP(config, **args)
    self.mesh = mesh

  def __call__(self, x, cos, sin, mask, cache=None):
    return self._block(x, lambda h: self.self_attn(h, cos, sin, mask, cache))

  def with_slots(self, x, cos, sin, view: SlotView):
    return self._block(x, lambda h: self.self_attn.with_slots(h, cos, sin, view))

  def _block(self, x, attend):
    h, new_cache = attend(self.input_layernorm(x))
    if self.sandwich:
      x = x + self.post_attention_layernorm(h)
      x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
    else:
      x = x + h
      x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, self.mesh, ("batch", "length", "act_embed")), new_cache


class DecoderModel(nnx.Module):
  """The HF `model.` subtree: embeddings, layers, final norm."""

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, mesh, rngs,
               scan_layers: bool = True):
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
        embedding_metadata={"logical_axes": ("vocab", "embed")})
    args = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    if scan_layers:
      self.layers = stacked_layers(config, config.num_hidden_layers, rngs=rngs, **args)
    else:
      self.layers = nnx.List([DecoderLayer(config, rngs=rngs, **args)
                              for _ in range(config.num_hidden_layers)])
    self.norm = _norm(config, config.hidden_size, param_dtype)


def stacked_layers(config: ModelConfig, n: int, *, rngs: nnx.Rngs, **args) -> DecoderLayer:
  """One DecoderLayer holding `n` layers: every parameter gets a leading dimension of size n,
  named "layers" in its logical axes (never sharded: sharding rules map it to ())."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return DecoderLayer(config, rngs=rngs, **args)

  layer = make(rngs)
  for _, node in nnx.iter_graph(layer):
    if isinstance(node, nnx.Param):
      axes = node.get_metadata().get("logical_axes")
      if axes is not None:
        node.set_metadata(logical_axes=("layers", *axes))
  return layer


class CausalLM(nnx.Module):
  """Decoder + LM head. `model(input_ids, attention_mask)` -> float32 logits [B, L, V].

  scan_layers: stacked layer parameters run under `lax.scan` (default; see the module
  docstring), else a python list of layers unrolled into the graph. attention: the kernel of
  full-sequence forwards (`model.attention`: auto | xla | cudnn | splash | einsum; see
  models/attention.py), resolved here for this platform and dtype; decoding always uses the
  dense einsum.
  """

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               mesh: Mesh | None = None, rngs: nnx.Rngs | None = None,
               scan_layers: bool = True, attention: str = "auto"):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.attention = attention_lib.resolve(attention, self.dtype, config.head_dim,
                                           soft_cap=config.attn_logit_softcapping)
    # Recompute each layer in the backward pass instead of storing its activations (training
    # memory ~ one layer's activations + the layer inputs); set by the trainer.
    self.remat = False
    self.mesh = mesh
    self.scan_layers = bool(scan_layers)
    self.model = DecoderModel(config, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                              rngs=rngs, scan_layers=self.scan_layers)
    if not config.tie_word_embeddings:
      self.lm_head = _linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), False,
                             dtype, param_dtype, rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, *,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Full-sequence forward.

    attention_mask: [B, L], 1 for real tokens (left or right padding). positions default to the
    count of real tokens before each one, so a padded row computes what it would alone.
    segment_ids: [B, L] for packed sequences (attention stays within a segment).
    """
    hidden = self.hidden_states(input_ids, attention_mask, positions, segment_ids=segment_ids)
    return self.logits(hidden)

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                    positions: jax.Array | None = None, *,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """The final-norm hidden states [B, L, E]; `logits(h)` projects them. Split so a loss can
    project chunk by chunk instead of materialising [B, L, vocab] float32 logits."""
    b, l = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, l), jnp.bool_)
    attention_mask = attention_mask.astype(jnp.bool_)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    if self.attention == "einsum":  # The dense reference mask.
      idx = jnp.arange(l)
      mask = (idx[None, :] <= idx[:, None])[None] & attention_mask[:, None, :]
      if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
      windows = self._window_masks(mask[:, None], idx, idx)
    else:  # A kernel: padding and packing as segment ids, each layer its static window.
      segs = attention_lib.Segments.from_mask(attention_mask, segment_ids, self.attention)
      used = {self.config.sliding_window(i) for i in range(self.config.num_hidden_layers)}
      windows = {w: segs.for_window(w) for w in sorted(used, key=lambda w: w or 0)}
    hidden = self._embed(input_ids)
    ropes = self._ropes(positions)
    if self.scan_layers:
      def body(h, layer, mask, rope, i, _):
        return layer(h, *rope, mask, None)[0], None
      hidden, _ = self._scan(body, hidden, windows, ropes, remat=self.remat)
      return self.model.norm(hidden)
    call = nnx.remat(_layer_call) if self.remat else _layer_call
    for i, layer in enumerate(self.model.layers):
      hidden = call(layer, hidden, *ropes[self.config.rope_index(i)],
                    windows[self.config.sliding_window(i)])
    return self.model.norm(hidden)

  def forward_cached(self, input_ids: jax.Array, attention_mask: jax.Array,
                     positions: jax.Array, cache: KVCache, last_only: bool = False
                     ) -> tuple[jax.Array, KVCache]:
    """Appends `input_ids` ([B, L], left padded) to the cache at `cache.index`; returns logits
    [B, L, V] (or [B, 1, V] for the last position with `last_only`, which is all a prefill
    needs) and the updated cache. Used by prefill (L = prompt) and decoding (L = 1)."""
    b, l = input_ids.shape
    s = cache.k.shape[3]
    valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask.astype(jnp.bool_),
                                         (0, cache.index))
    q_idx = cache.index + jnp.arange(l)
    k_idx = jnp.arange(s)
    mask = (k_idx[None, :] <= q_idx[:, None])[None] & valid[:, None, :]
    windows = self._window_masks(mask[:, None], q_idx, k_idx)
    hidden = self._embed(input_ids)
    ropes = self._ropes(positions)
    ks, vs = cache.k, cache.v
    if self.scan_layers:
      # The whole cache rides in the carry and each step writes its layer's slot in place
      # (dynamic_update_slice at the traced layer index), as the unrolled loop does. Passing
      # k[l], v[l] as scanned inputs and the updated slices as outputs measured the same
      # (Qwen2.5-0.5B decode bucket on CPU: compile and decode time within noise), and the
      # carry needs no per-layer copy of the slices.
      def body(carry, layer, mask, rope, i, _):
        h, ks, vs = carry
        h, (ks, vs) = layer(h, *rope, mask, (ks, vs, i, cache.index))
        return (h, ks, vs), None
      (hidden, ks, vs), _ = self._scan(body, (hidden, ks, vs), windows, ropes)
    else:
      for i, layer in enumerate(self.model.layers):
        hidden, (ks, vs) = layer(hidden, *ropes[self.config.rope_index(i)],
                                 windows[self.config.sliding_window(i)],
                                 (ks, vs, i, cache.index))
    new_cache = KVCache(k=ks, v=vs, valid=valid, index=cache.index + l)
    if last_only:
      hidden = hidden[:, -1:]
    return self.logits(self.model.norm(hidden)), new_cache

  def forward_slots(self, input_ids: jax.Array, counts: jax.Array, cache: SlotCache,
                    prefix: PrefixCache) -> tuple[jax.Array, SlotCache]:
    """A decode step of every slot (continuous batching): row b of `input_ids` [slots, L] is
    appended to slot b at that slot's own length; `counts` [slots] real tokens per row (0: the
    slot is idle and keeps its length). Tokens sit at positions prefix.length + slot length + j
    and see the prefix and their slot's earlier tokens. Returns the final-norm hidden state of
    each row's last real token [slots, 1, E] and the cache with the new lengths.
    """
    b, l = input_ids.shape
    t, c = cache.k.shape[3], prefix.k.shape[3]
    idx = cache.lengths[:, None] + jnp.arange(l)[None, :]  # Slot-local index of each token.
    visible = jnp.concatenate([
        jnp.broadcast_to(jnp.arange(c) < prefix.length, (b, l, c)),
        jnp.arange(t)[None, None, :] <= idx[:, :, None]], axis=-1)
    k_pos = jnp.concatenate([jnp.arange(c), prefix.length + jnp.arange(t)])[None]
    hidden, ks, vs = self._through_slots(input_ids, None, prefix.length + idx, visible, k_pos,
                                         cache, prefix, rows=None, idx=idx)
    last = jnp.take_along_axis(hidden, jnp.maximum(counts - 1, 0)[:, None, None], axis=1)
    return self.model.norm(last), SlotCache(k=ks, v=vs, lengths=cache.lengths + counts)

  def forward_packed(self, input_ids: jax.Array, slot: jax.Array, idx: jax.Array,
                     cache: SlotCache, prefix: PrefixCache, at: jax.Array
                     ) -> tuple[jax.Array, SlotCache]:
    """Prefill of new prompts packed end to end, so a call wastes no padding on short prompts.

    input_ids, slot, idx: [B, L] streams of tokens (one per data-parallel shard), each
    token's slot (>= slots: a filler that writes nowhere) and slot-local index (0 starts a
    new sequence in that slot; a prompt may continue from the row's previous call). Every
    token's keys/values are written before any is read, so a token sees its own prompt's
    earlier tokens of this call. at: [R] tokens (flat indices into B x L) whose hidden states
    to return: prompts' last tokens, whose next token is the first generated. Returns the
    final-norm hidden states [R, 1, E] and the cache with each written slot's new length.
    """
    b, l = input_ids.shape
    n_slots, t = cache.k.shape[1], cache.k.shape[3]
    c = prefix.k.shape[3]
    # Each prompt has its own slot, so a slot names a prompt. Only a row's first prompt can
    # have tokens from an earlier call: it reads its slot's cache row (this call's tokens
    # included, once written); the others read only this call's keys.
    carry = idx[:, 0] > 0
    in_carry = carry[:, None] & (slot == slot[:, :1])
    same = slot[:, :, None] == slot[:, None, :]
    causal = idx[:, None, :] <= idx[:, :, None]
    visible = jnp.concatenate([
        jnp.broadcast_to(jnp.arange(c) < prefix.length, (b, l, c)),
        in_carry[:, :, None] & (jnp.arange(t)[None, None, :] <= idx[:, :, None]),
        ~in_carry[:, :, None] & same & causal], axis=-1)
    pos = prefix.length + idx
    k_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(c), (b, c)),
                             jnp.broadcast_to(prefix.length + jnp.arange(t), (b, t)), pos], axis=1)
    hidden, ks, vs = self._through_slots(
        input_ids, slot, pos, visible, k_pos, cache, prefix,
        rows=jnp.where(carry, slot[:, 0], n_slots), idx=idx, self_keys=True)
    picked = jnp.take(hidden.reshape(b * l, -1), at, axis=0, mode="clip")[:, None]
    lengths = cache.lengths.at[jnp.where(idx == 0, slot, n_slots)].set(0, mode="drop")
    lengths = lengths.at[slot].max(idx + 1, mode="drop")
    return self.model.norm(picked), SlotCache(k=ks, v=vs, lengths=lengths)

  def _through_slots(self, input_ids, write_rows, pos, visible, k_pos, cache: SlotCache,
                     prefix: PrefixCache, *, rows, idx, self_keys: bool = False):
    """The layers over tokens `input_ids` [B, L] at positions `pos` [B, L], written at
    slot-local `idx` [B, L] of slots `write_rows` (None: row b is slot b); `rows` are the
    cache rows each batch row reads, `visible` [B, L, keys] the mask over the keys (prefix,
    read rows, and the new tokens with `self_keys`) at positions `k_pos` [1 or B, keys].
    Returns (hidden
    [B, L, E], keys, values)."""
    masks = {None: visible}
    for w in set(self.config.sliding_windows or ()) - {None}:
      masks[w] = visible & (k_pos[:, None, :] > pos[:, :, None] - w)
    hidden = self._embed(input_ids)
    ropes = self._ropes(pos)

    def view(ks, vs, i, mask):
      return SlotView(ks, vs, i, rows, idx, prefix.k, prefix.v, mask, write_rows=write_rows,
                      self_keys=self_keys)

    ks, vs = cache.k, cache.v
    if self.scan_layers:  # The caches ride in the carry, as in forward_cached.
      def body(carry, layer, mask, rope, i, _):
        h, ks, vs = carry
        h, (ks, vs) = layer.with_slots(h, *rope, view(ks, vs, i, mask))
        return (h, ks, vs), None
      (hidden, ks, vs), _ = self._scan(body, (hidden, ks, vs), masks, ropes)
    else:
      for i, layer in enumerate(self.model.layers):
        hidden, (ks, vs) = layer.with_slots(
            hidden, *ropes[self.config.rope_index(i)],
            view(ks, vs, i, masks[self.config.sliding_window(i)]))
    return hidden, ks, vs

  def prefill_prefix(self, input_ids: jax.Array, length: jax.Array, dtype=None) -> PrefixCache:
    """The KV of a shared prefix `input_ids` [1, C] (first `length` tokens real), computed and
    stored once for every slot, in `dtype` (the KV cache's; default the compute dtype). The
    prefix's own later tokens read its keys as stored, as every decode step does."""
    c = input_ids.shape[1]
    mask = jnp.arange(c)[None, :] < length
    cache = KVCache.zeros(self.config, 1, c, dtype or self.dtype)
    _, cache = self.forward_cached(input_ids, mask, jnp.arange(c)[None, :], cache,
                                   last_only=True)
    return PrefixCache(k=sharding.constrain(cache.k, self.mesh, PREFIX_AXES),
                       v=sharding.constrain(cache.v, self.mesh, PREFIX_AXES),
                       length=jnp.asarray(length, jnp.int32))

  # ------------------------------------------------------------------ pieces

  def _scan(self, body, carry, windows: dict[Any, jax.Array], ropes, xs=None,
            remat: bool = False):
    """Runs `body(carry, layer, mask, rope, i, x) -> (carry, y)` over the stacked layers with
    `lax.scan`; returns (carry, stacked ys). The parameters are scanned (row i = layer i),
    as are `xs`; everything else of the layer (the LoRA dropout key) is shared. `mask` is
    layer i's entry of `windows` and `rope` its (cos, sin) of `ropes`: the distinct masks and
    tables are stacked and indexed with per-layer indices (scanned inputs)."""
    n = self.config.num_hidden_layers
    graphdef, params, rest = nnx.split(self.model.layers, nnx.Param, ...)
    keys = list(windows)
    window_idx = jnp.asarray([keys.index(self.config.sliding_window(i)) for i in range(n)],
                             jnp.int32)
    rope_idx = jnp.asarray([self.config.rope_index(i) for i in range(n)], jnp.int32)
    rope_stack = (jax.tree.map(lambda *t: jnp.stack(t), *ropes) if len(ropes) > 1 else None)
    segments = isinstance(windows[keys[0]], attention_lib.Segments)
    stacked = (jnp.stack([windows[k] for k in keys]) if len(keys) > 1 and not segments
               else None)

    def step(c, inputs):
      p, i, w, r, x = inputs
      layer = nnx.merge(graphdef, p, rest, copy=True)  # Fresh variables in this trace.
      lora.fold_in_layer(layer, i)  # Distinct adapter dropout per layer (no-op without LoRA).
      if segments:  # A kernel's window is static: the layer picks its branch (lax.switch).
        mask = (windows[keys[0]] if len(keys) == 1
                else windows[keys[0]].for_windows(w, tuple(keys)))
      else:
        mask = windows[keys[0]] if stacked is None else stacked[w]
      rope = ropes[0] if rope_stack is None else jax.tree.map(lambda t: t[r], rope_stack)
      return body(c, layer, mask, rope, i, x)

    if remat:  # The layer body is recomputed in the backward pass, as nnx.remat unrolled.
      step = jax.checkpoint(step, prevent_cse=False)
    return jax.lax.scan(step, carry,
                        (params, jnp.arange(n, dtype=jnp.int32), window_idx, rope_idx, xs))

  def _ropes(self, positions: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """(cos, sin) [B, L, head_dim] of each RoPE table (`ModelConfig.rope_tables`)."""
    return [rope_cos_sin(inv, positions, self.dtype) for inv in self.config.rope_tables()]

  def _embed(self, input_ids):
    hidden = self.model.embed_tokens(input_ids).astype(self.dtype)
    if self.config.embed_scale:  # Gemma: sqrt(hidden), rounded to the compute dtype as HF.
      hidden = hidden * jnp.asarray(self.config.hidden_size ** 0.5, self.dtype)
    return sharding.constrain(hidden, self.mesh, ("batch", "length", "act_embed"))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits of final-norm hidden states."""
    if self.config.tie_word_embeddings:
      logits = self.model.embed_tokens.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    logits = attention_lib.cap_scores(logits.astype(jnp.float32),
                                      self.config.final_logit_softcapping)
    return sharding.constrain(logits, self.mesh, ("batch", "length", "act_vocab"))

  def _window_masks(self, mask, q_idx, k_idx) -> dict[Any, jax.Array]:
    """The causal/padding mask, plus one variant per distinct sliding window (HF semantics:
    a key is visible when q_idx - window < k_idx)."""
    out = {None: mask}
    for w in set(self.config.sliding_windows or ()) - {None}:
      out[w] = mask & (k_idx[None, :] > q_idx[:, None] - w)[None, None]
    return out


def _layer_call(layer: DecoderLayer, hidden, cos, sin, mask):
  return layer(hidden, cos, sin, mask)[0]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Position of each token = number of real tokens before it (pads get 0)."""
  m = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)
