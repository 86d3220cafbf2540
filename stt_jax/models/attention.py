"""Attention kernels and the choice between them (`model.attention`).

Full-sequence self-attention (training, the loss, log-likelihood scoring: every
`CausalLM.__call__` / `hidden_states`) runs one of:

- `einsum`: the reference. Float32 scores [B, K, G, L, S] from two einsums and a dense mask,
  exactly the decoder's original code; decoding (`forward_cached`, `forward_slots`,
  `forward_packed`) always uses it (`dense`).
- `xla`: `jax.nn.dot_product_attention(implementation='xla')`. Any platform and dtype; GQA
  without repeating K/V. It still materialises the scores (the same memory as `einsum`).
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN flash attention:
  GPU only, bfloat16/float16, head_dim a multiple of 8 and <= 128 (256 on Hopper). Padding
  and packing go in as a boolean mask (cuDNN adds it as a bias [B, 1, L, L] in the compute
  dtype: no per-head scores); the sequence is padded to an even length (cuDNN's training
  kernels with a bias need one).
- `splash`: Pallas splash attention (TPU): causal or local (sliding window) masks, segment ids
  for padding and packing, one MQA kernel per KV head (its G query heads read one K/V: no
  repeat), vmapped over batch and KV heads, under `shard_map` when a mesh is given. The
  sequence is padded to a multiple of 128 (the kernel's block size). `splash_interpret` runs
  the same kernel in Pallas interpret mode on any platform (tests, benchmarks).
- `auto`: TPU -> splash; GPU -> cudnn when the dtype and head_dim allow, else xla; CPU ->
  xla. With an attention logit soft-cap (Gemma 2): TPU -> splash, else einsum. The choice is
  logged once.

Padding and packing reach the kernels as segment ids, one per query and one per key: a query
sees the earlier keys of its own segment (and, with a window w, only the last w of them: HF's
q - w < k). Padding keys sit in a segment of their own (-1), so every real token attends
exactly as with the dense mask. Padding queries: after a row's real tokens (right padding,
unpacked) they read the real tokens, as the dense mask and HF do, so even their logits match;
before them (left padding) and in packed rows they read the padding (a finite row where the
dense mask has an all-masked one; no NaN reaches the gradients).

Cached prefill keeps the dense path: its queries sit at a traced offset (`cache.index`) of a
longer cache whose validity is a traced mask, and splash masks are static. The engine's packed
prefill (`forward_packed`) reads three key sets (the shared prefix, the slot's cached row, the
call's own tokens) with a per-token mask; only the last block is a segment-causal self-attention
a kernel could run (segments = slots), merged with the other two by their log-sum-exp, which is
left for when prompt prefill dominates the engine's time.

Every kernel takes `scale` (the scores' factor: head_dim ** -0.5, or Gemma's
query_pre_attn_scalar ** -0.5) and `soft_cap` (Gemma 2's cap * tanh(scores / cap), after the
scale, before the mask); einsum and splash apply the cap, xla and cudnn cannot
(jax.nn.dot_product_attention has none), so `resolve` refuses them for a capped model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from stt_jax import sharding

# The config choices (model.attention); `splash_interpret` is for tests and benchmarks only.
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "einsum")
_LIBRARY_ONLY = ("splash_interpret",)
NEG = -1e30  # Finite "minus infinity": a fully masked row gives uniform weights, not NaN.
PAD_SEGMENT = -1  # Segment id of padding tokens (never a real segment's).
SPLASH_BLOCK = 128  # Splash block size; the sequence is padded to a multiple of it.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)

_logged: set = set()


class AttentionError(ValueError):
  """A `model.attention` that this platform, dtype or shape cannot run."""


def _error(requested: str, why: str, fix: str) -> AttentionError:
  return AttentionError(f"model.attention={requested!r}: {why}; {fix}")


def resolve(requested: str, dtype, head_dim: int, platform: str | None = None,
            soft_cap: float | None = None) -> str:
  """The implementation that runs for `requested` (one of IMPLEMENTATIONS) on `platform`
  (default: jax's default backend) with compute `dtype` and the model's attention logit
  `soft_cap`; `auto` picks per platform and logs its choice once. An impossible request
  raises AttentionError, one line naming the key."""
  platform = (platform or jax.default_backend()).lower()
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  dtype = jnp.dtype(dtype)
  if requested not in IMPLEMENTATIONS + _LIBRARY_ONLY:
    raise _error(requested, "unknown implementation", f"use one of {', '.join(IMPLEMENTATIONS)}")
  cudnn_why = _cudnn_unfit(dtype, head_dim)
  if soft_cap and requested in ("xla", "cudnn"):
    raise _error(requested, f"the model caps attention logits (attn_logit_softcapping="
                 f"{soft_cap:g}) and jax.nn.dot_product_attention has no soft-cap",
                 "use model.attention=auto (splash on TPU, einsum elsewhere) or einsum")
  if requested == "auto":
    if platform == "tpu":
      chosen = "splash"
    elif soft_cap:
      chosen = "einsum"
      cudnn_why = "no logit soft-cap"
    elif platform == "gpu" and cudnn_why is None:
      chosen = "cudnn"
    else:
      chosen = "xla"
    key = (platform, str(dtype), head_dim, chosen)
    if key not in _logged:
      _logged.add(key)
      logging.info("attention: model.attention=auto -> %s (platform %s, dtype %s%s)", chosen,
                   platform, dtype, f"; cudnn: {cudnn_why}" if platform == "gpu" and cudnn_why
                   else "")
    return chosen
  if requested == "cudnn":
    if platform != "gpu":
      raise _error(requested, f"cuDNN needs a GPU, this platform is {platform}",
                   "use model.attention=auto (or xla)")
    if cudnn_why is not None:
      raise _error(requested, cudnn_why, "use model.attention=xla (or auto)")
  if requested == "splash" and platform != "tpu":
    raise _error(requested, f"splash attention is a TPU kernel, this platform is {platform}",
                 "use model.attention=auto (or xla)")
  return requested


def _cudnn_unfit(dtype, head_dim: int) -> str | None:
  """Why cuDNN flash attention cannot take this model, or None."""
  if dtype not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
    return f"cuDNN flash attention needs bfloat16 or float16, the model computes in {dtype}"
  if head_dim % 8 or head_dim > 256:
    return f"cuDNN flash attention needs head_dim a multiple of 8 and <= 256, got {head_dim}"
  return None


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("segment_ids", "q_segment_ids", "window_index"),
                   meta_fields=("implementation", "window", "windows"))
@dataclasses.dataclass(frozen=True)
class Segments:
  """The mask of full-sequence causal self-attention in structured form.

  segment_ids: [B, L] int32, each key's segment (PAD_SEGMENT for padding); q_segment_ids
  [B, L] each query's; `implementation` a resolved name; window: a static sliding window
  (None: full), or, for layers scanned together whose windows differ, `window_index` (a traced
  int32) into the static `windows`."""

  segment_ids: jax.Array
  q_segment_ids: jax.Array
  implementation: str
  window: int | None = None
  window_index: jax.Array | None = None
  windows: tuple[int | None, ...] = ()

  @classmethod
  def from_mask(cls, attention_mask: jax.Array, segment_ids: jax.Array | None,
                implementation: str) -> Segments:
    """attention_mask [B, L] (1 = real token) and optional packing ids [B, L]."""
    attention_mask = attention_mask.astype(jnp.bool_)
    if segment_ids is None:
      keys = jnp.where(attention_mask, 0, PAD_SEGMENT)
      after_real = jnp.cumsum(attention_mask, axis=1) > 0  # Right padding reads the row.
      return cls(keys, jnp.where(after_real, 0, PAD_SEGMENT), implementation)
    keys = jnp.where(attention_mask, segment_ids.astype(jnp.int32), PAD_SEGMENT)
    return cls(keys, keys, implementation)

  def for_window(self, window: int | None) -> Segments:
    return dataclasses.replace(self, window=window, window_index=None, windows=())

  def for_windows(self, index: jax.Array, windows: tuple[int | None, ...]) -> Segments:
    return dataclasses.replace(self, window=None, window_index=index, windows=windows)


def causal(q: jax.Array, k: jax.Array, v: jax.Array, mask: Segments, *,
           mesh: Mesh | None = None, soft_cap: float | None = None,
           scale: float | None = None) -> jax.Array:
  """Causal self-attention within segments. q [B, L, H, D]; k, v [B, K, L, D]
  (H a multiple of K); mesh: where the activations live (splash runs under shard_map on it);
  scale: the scores' factor (default D ** -0.5). Returns [B, L, H, D] in q's dtype."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if mask.window_index is not None:  # Scanned layers of different windows: one branch each.
    branches = [functools.partial(_causal_static, window=w, soft_cap=soft_cap, scale=scale,
                                  mask=mask.for_window(w), mesh=mesh) for w in mask.windows]
    return jax.lax.switch(mask.window_index, [lambda q, k, v, f=f: f(q, k, v) for f in branches],
                          q, k, v)
  return _causal_static(q, k, v, mask=mask, window=mask.window, soft_cap=soft_cap,
                        scale=scale, mesh=mesh)


def _causal_static(q, k, v, *, mask: Segments, window: int | None, soft_cap, scale, mesh):
  impl = mask.implementation
  if impl == "einsum":
    dense_mask = segment_mask(mask.q_segment_ids, mask.segment_ids, window)[:, None]
    return dense(q, k, v, dense_mask, soft_cap=soft_cap, scale=scale)
  if impl in ("xla", "cudnn"):
    if soft_cap is not None:
      raise _error(impl, "jax.nn.dot_product_attention has no logit soft-cap",
                   "use model.attention=einsum (or splash on TPU)")
    return _jax_nn(q, k, v, mask.q_segment_ids, mask.segment_ids, window, impl, scale)
  if impl in ("splash", "splash_interpret"):
    return _splash(q, k, v, mask.q_segment_ids, mask.segment_ids, window, soft_cap, scale,
                   mesh=mesh, interpret=impl == "splash_interpret")
  raise _error(impl, "not a resolved implementation", "pass it through attention.resolve")


def segment_mask(q_segment_ids: jax.Array, segment_ids: jax.Array,
                 window: int | None = None) -> jax.Array:
  """Dense [B, L, L] bool: causal, same segment, inside the window (q - window < k)."""
  l = segment_ids.shape[1]
  idx = jnp.arange(l)
  causal_ = idx[None, :] <= idx[:, None]
  if window is not None:
    causal_ &= idx[None, :] > idx[:, None] - window
  return causal_[None] & (q_segment_ids[:, :, None] == segment_ids[:, None, :])


def dense(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
          soft_cap: float | None = None, scale: float | None = None) -> jax.Array:
  """The reference: float32 scores with a dense mask. q [B, L, H, D]; k, v [B, K, S, D];
  mask [B, 1, L, S] bool; scale default D ** -0.5. Returns [B, L, H, D] in q's dtype."""
  b, l, h, d = q.shape
  kh = k.shape[1]
  q = q.reshape(b, l, kh, h // kh, d)
  scores = jnp.einsum("blkgd,bksd->bkgls", q, k, preferred_element_type=jnp.float32)
  scores = cap_scores(scores * (d ** -0.5 if scale is None else scale), soft_cap)
  scores = jnp.where(mask[:, :, None, :, :], scores, NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bkgls,bksd->blkgd", probs, v).reshape(b, l, h, d)


def cap_scores(scores: jax.Array, soft_cap: float | None) -> jax.Array:
  """Gemma 2's logit soft-cap: cap * tanh(scores / cap); identity without a cap."""
  if soft_cap is None:
    return scores
  return soft_cap * jnp.tanh(scores / soft_cap)


def _pad_length(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _jax_nn(q, k, v, q_seg, kv_seg, window, impl, scale):
  l = q.shape[1]
  if impl == "cudnn":  # cuDNN's training kernels with a bias need even lengths.
    q, k, v = _pad_length(q, 1, 2), _pad_length(k, 2, 2), _pad_length(v, 2, 2)
    q_seg = _pad_length(q_seg, 1, 2, PAD_SEGMENT - 1)
    kv_seg = _pad_length(kv_seg, 1, 2, PAD_SEGMENT - 1)
  mask = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]  # [B, 1, L, L]
  out = jax.nn.dot_product_attention(
      q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0), implementation=impl,
      scale=scale)
  return out[:, :l]


def _splash_lib():
  """The splash kernel and mask modules (imported on first use: Pallas TPU code)."""
  from jax.experimental.pallas.ops.tpu import splash_attention  # pylint: disable=g-import-not-at-top
  return splash_attention.splash_attention_kernel, splash_attention.splash_attention_mask


@functools.lru_cache(maxsize=64)
def _splash_kernel(length: int, groups: int, window: int | None, soft_cap: float | None,
                   interpret: bool):
  """One MQA splash kernel: G query heads [G, L, D] over one K/V [L, D] (a GQA group)."""
  sk, sm = _splash_lib()
  shape = (length, length)
  if window is None:
    head = sm.CausalMask(shape)
  else:
    head = sm.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  block = math.gcd(length, 512)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # Concrete mask tables, reusable by every trace.
    return sk.make_splash_mqa(sm.MultiHeadMask([head] * groups), block_sizes=sizes,
                              attn_logits_soft_cap=soft_cap, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash(q, k, v, q_seg, kv_seg, window, soft_cap, scale, *, mesh, interpret):
  b, l, h, d = q.shape
  kh = k.shape[1]
  g = h // kh
  q = (q * scale).astype(q.dtype)  # The kernel does not scale the logits.
  q = _pad_length(q, 1, SPLASH_BLOCK)
  k, v = _pad_length(k, 2, SPLASH_BLOCK), _pad_length(v, 2, SPLASH_BLOCK)
  # The padded tail is one more segment: it sees only itself, the real tokens never see it.
  q_seg = _pad_length(q_seg, 1, SPLASH_BLOCK, PAD_SEGMENT - 1)
  kv_seg = _pad_length(kv_seg, 1, SPLASH_BLOCK, PAD_SEGMENT - 1)
  lp = q.shape[1]
  q = q.reshape(b, lp, kh, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, D]

  def run(q, k, v, q_seg, kv_seg):
    sk, _ = _splash_lib()
    kernel = _splash_kernel(lp, g, window, soft_cap, interpret)

    def one(qg, kk, vv, sq, skv):  # [G, L, D], [L, D], [L, D], [L], [L]
      return kernel(qg, kk, vv, segment_ids=sk.SegmentIds(q=sq, kv=skv))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # Over KV heads.
    return jax.vmap(per_head)(q, k, v, q_seg, kv_seg)  # Over the batch.

  if mesh is not None:  # A Pallas call is not partitioned by XLA: shard it by hand.
    spec = lambda axes, x: sharding.logical_to_spec(axes, x.shape, mesh)
    q_spec = spec(("batch", "act_kv_heads", None, None, None), q)
    kv_spec = spec(("batch", "act_kv_heads", None, None), k)
    seg_spec = spec(("batch", None), q_seg)
    specs = (q_spec, kv_spec, kv_spec, seg_spec, seg_spec)
    run = jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)
  out = run(q, k, v, q_seg, kv_seg)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, lp, h, d)[:, :l]
