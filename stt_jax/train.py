"""Fine-tuning: config, sharded jit train step (full or LoRA), and the resumable train loop.

  config = default_train_config()            # sections `train` and `checkpoint`
  result = train("path/to/hf_model", tokenizer, "mgsm", {"en": rows, "translated": rows_de},
                 config, workdir, mesh)       # resumes from workdir/checkpoints
  save_hf(result.model, model_config, out_dir)   # LoRA is merged on export

The step is one `jax.jit` over the mesh: in/out shardings come from the parameters' logical
axes (optimizer state sharded like its parameter), the train state is donated, gradient
accumulation is a `lax.scan` over micro-batches, and the loss is the mean over target tokens
of the whole global batch (so accumulation equals one big batch). Only the trainable
variables (all `nnx.Param`s, or only `nnx.LoRAParam`s) are differentiated and carry AdamW
state; frozen base weights are a separate, non-donated argument.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from stt_jax import appendlog, checkpoint, faults, sharding, train_data
from stt_jax.models import hf_io, lora
from stt_jax.models.decoder import CausalLM
from stt_jax.tasks import Task, get_task

METHODS = ("full", "lora")
DTYPES = ("float32", "bfloat16", "float16")

# Dense bf16 peak FLOP/s per device, matched as a substring of `device.device_kind` (longest
# match wins). TPU v2/v3 expose each core as a device. Override with train.peak_flops.
PEAK_FLOPS = {
    "TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12, "TPU7x": 2307e12, "A100": 312e12, "H100": 989e12, "H200": 989e12,
    "H800": 989e12, "B200": 2250e12, "GB200": 2500e12, "L4": 121e12,
}


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss, gradient or parameter; that state was not saved."""


# ------------------------------------------------------------------------------ config


def default_train_config() -> ml_collections.ConfigDict:
  """The `train` and `checkpoint` sections with every field's default (locked: a mistyped key
  is an error, and values keep their types)."""
  c = ml_collections.ConfigDict()
  t = c.train = ml_collections.ConfigDict()
  t.method = "lora"  # 'full': every weight is trained; 'lora': adapters only, base frozen.
  t.remat = False  # Recompute each decoder layer in the backward (less memory, ~1/3 more FLOPs).
  t.lora = ml_collections.ConfigDict()
  t.lora.rank = 16  # Adapter rank r.
  t.lora.alpha = 32.0  # Update scale is alpha / rank.
  t.lora.dropout = 0.05  # Dropout on the adapter input (training only).
  t.lora.targets = "all"  # Comma-separated projections (q_proj,...,down_proj) or 'all'.
  t.lr = 2e-4  # Peak learning rate of AdamW.
  t.min_lr_ratio = 0.1  # Cosine decays to lr * min_lr_ratio at the last step.
  t.warmup_steps = 50  # Linear warmup from 0 to lr, in optimizer steps ...
  # ... or as a fraction of this run's total steps (0 = use warmup_steps), so variants with
  # 2-4x different step counts share one LR shape. Set one of the two; the other must be 0.
  t.warmup_ratio = 0.0
  t.steps = 0  # Optimizer steps; 0 = derive from `epochs`.
  t.epochs = 2  # Passes over the mixture (used when steps == 0).
  t.batch_size = 32  # Sequences (packed rows of seq_len tokens) per optimizer step, global.
  t.grad_accum = 1  # Micro-batches per step (batch_size must divide evenly).
  t.seq_len = 1024  # Tokens per row; longer examples are truncated (counted in the log).
  t.packing = True  # Pack several examples per row (segment ids keep them apart).
  t.weight_decay = 0.0  # AdamW decoupled weight decay (matrices only, not norms/biases).
  t.clip_norm = 1.0  # Clip the global gradient norm; 0 = off.
  t.adam_b1 = 0.9
  t.adam_b2 = 0.999
  t.adam_eps = 1e-8
  t.dtype = "bfloat16"  # Compute dtype (activations, matmuls).
  t.param_dtype = "float32"  # Master weights and optimizer state (frozen LoRA base: dtype).
  t.mixture = ml_collections.ConfigDict()
  # Rows of each source per epoch, as a multiple of its size: 1.0 = every row once (the
  # paper's union), 0.5 = a different random half each epoch, 2.0 = every row twice.
  t.mixture.en = 1.0
  t.mixture.translated = 1.0
  t.mixture.code_switched = 1.0
  t.seed = 0  # Data order, LoRA init and dropout.
  t.log_every = 10  # Steps between metrics.jsonl rows.
  t.peak_flops = 0.0  # Peak FLOP/s per device for MFU; 0 = from PEAK_FLOPS by device kind.
  k = c.checkpoint = ml_collections.ConfigDict()
  k.every = 200  # Save every N optimizer steps (and at the end, and on SIGTERM).
  k.keep = 3  # Checkpoints kept; 0 = all.
  k.async_save = True  # Write in a background thread while training continues.
  c.lock()
  return c


def validate(config: Mapping | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `train` and `checkpoint` sections of `config` over the defaults, checked.

  Unknown keys (with a did-you-mean), wrong types and out-of-range values raise ValueError.
  Other sections of a full run config are ignored.
  """
  out = default_train_config()
  for section in ("train", "checkpoint"):
    given = config.get(section) if hasattr(config, "get") else None
    if given is None:
      continue
    given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given)
    _merge(out[section], given, section)
  t, k = out.train, out.checkpoint

  def check(ok, msg):
    if not ok:
      raise ValueError(f"config: {msg}")

  check(t.method in METHODS, f"train.method must be one of {METHODS}, got {t.method!r}")
  check(t.dtype in DTYPES and t.param_dtype in DTYPES,
        f"train.dtype/param_dtype must be in {DTYPES}, got {t.dtype!r}/{t.param_dtype!r}")
  try:
    lora.parse_targets(t.lora.targets)
  except ValueError as e:
    raise ValueError(f"config: train.{e}") from None
  check(t.lora.rank > 0, f"train.lora.rank must be positive, got {t.lora.rank}")
  check(0 <= t.lora.dropout < 1, f"train.lora.dropout must be in [0, 1), got {t.lora.dropout}")
  check(t.lr > 0, f"train.lr must be positive, got {t.lr}")
  check(t.steps > 0 or t.epochs > 0, "set train.steps or train.epochs to a positive number")
  check(t.steps >= 0 and t.warmup_steps >= 0 and t.log_every > 0, "train.steps/warmup_steps "
        "must be >= 0 and train.log_every > 0")
  check(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
  check(not (t.warmup_ratio > 0 and t.warmup_steps > 0),
        f"train.warmup_steps={t.warmup_steps} and train.warmup_ratio={t.warmup_ratio} are both "
        "set; set the one you do not want to 0 (e.g. --config.train.warmup_steps=0)")
  check(t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
        f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum="
        f"{t.grad_accum}")
  check(t.seq_len > 1, f"train.seq_len must be > 1, got {t.seq_len}")
  check(all(v >= 0 for v in t.mixture.values()), "train.mixture weights must be >= 0")
  check(k.every > 0 and k.keep >= 0, "checkpoint.every must be > 0 and checkpoint.keep >= 0")
  return out


def _merge(target: ml_collections.ConfigDict, given: Mapping, where: str) -> None:
  for key, value in given.items():
    if key not in target:
      close = difflib.get_close_matches(key, list(target.keys()), n=1, cutoff=0.5)
      hint = f"; did you mean {where}.{close[0]}?" if close else ""
      raise ValueError(f"config: unknown key {where}.{key}{hint} (known: "
                       f"{', '.join(sorted(target.keys()))})")
    if isinstance(target[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ValueError(f"config: {where}.{key} must be a section, got {value!r}")
      _merge(target[key], value, f"{where}.{key}")
      continue
    try:
      target[key] = value
    except TypeError as e:
      raise ValueError(f"config: {where}.{key}: {e}") from None


# ------------------------------------------------------------------------------ optimizer


def make_optimizer(t: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup + cosine decay, after global-norm clipping.

  The decay always spans `total_steps`; with train.warmup_ratio the warmup does too, so the LR
  at a given fraction of training is the same whatever the run's length.
  """
  warmup = round(t.warmup_ratio * total_steps) if t.warmup_ratio > 0 else t.warmup_steps
  warmup = min(warmup, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=t.lr * t.min_lr_ratio)
  adamw = optax.adamw(schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                      weight_decay=t.weight_decay,
                      mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  tx = optax.chain(optax.clip_by_global_norm(t.clip_norm), adamw) if t.clip_norm > 0 else adamw
  return tx, schedule


# ------------------------------------------------------------------------------ step


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


def _micro_grads(params, frozen, micro, key, graphdef):
  """Gradient of the summed target-token loss of one micro-batch w.r.t. `params`."""

  def loss_fn(p):
    model = nnx.merge(graphdef, p, frozen)
    lora.set_dropout_key(model, key)
    total, count = token_loss_sum(model, micro)
    return total, count

  (total, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return total, count, grads


def loss_and_grads(params, frozen, batch, key, *, graphdef):
  """Mean target-token loss and its gradient over a batch of [accum, micro, L] arrays."""
  accum = batch["inputs"].shape[0]
  keys = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(
      jax.random.wrap_key_data(key), i)))(jnp.arange(accum))
  if accum == 1:
    total, count, grads = _micro_grads(params, frozen, jax.tree.map(lambda x: x[0], batch),
                                       keys[0], graphdef)
  else:
    def body(carry, xs):
      micro, k = xs
      t, c, g = _micro_grads(params, frozen, micro, k, graphdef)
      return jax.tree.map(jnp.add, carry, (t, c, g)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(jnp.zeros_like, params))
    (total, count, grads), _ = jax.lax.scan(body, zeros, (batch, keys))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
  return total / denom, count, grads


def _train_step(state, frozen, batch, *, graphdef, tx, schedule):
  step = state["step"]
  key = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step))
  loss, count, grads = loss_and_grads(state["params"], frozen, batch, key, graphdef=graphdef)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step),
             "target_tokens": count, "tokens": jnp.sum(batch["segment_ids"] > 0),
             "params_finite": finite}
  new_state = {"step": step + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
  return new_state, metrics


def _nest(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for keys, value in flat.items():
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return out


def _shardings(state: nnx.State, mesh: Mesh) -> dict:
  """Pure-dict tree of NamedShardings from each variable's logical axes (else replicated)."""
  flat = {}
  for keys, var in nnx.to_flat_state(state):
    shape = tuple(var.get_value().shape)
    axes = var.get_metadata().get("logical_axes")
    if axes is None or len(axes) != len(shape):
      flat[keys] = NamedSharding(mesh, P())
    else:
      flat[keys] = sharding.named_sharding(mesh, axes, shape)
  return _nest(flat)


class Trainer:
  """The model split into (graphdef, trainable, frozen), the optimizer, and the jitted step.

  The train state is a pytree of arrays {step, params, opt_state, rng} (params: a pure dict
  of the trainable variables), which is exactly what a checkpoint holds.
  """

  def __init__(self, model: nnx.Module, t: ml_collections.ConfigDict, mesh: Mesh,
               total_steps: int):
    self.mesh = mesh
    self.accum = t.grad_accum
    self.micro = t.batch_size // t.grad_accum
    self.seq_len = t.seq_len
    self.seed = t.seed
    trainable = nnx.LoRAParam if t.method == "lora" else nnx.Param
    self.graphdef, params, frozen = nnx.split(model, trainable, ...)
    self._params = nnx.to_pure_dict(params)
    self.frozen = nnx.to_pure_dict(frozen)
    self.tx, self.schedule = make_optimizer(t, total_steps)
    replicated = NamedSharding(mesh, P())
    params_sh = _shardings(params, mesh)
    self.frozen_sharding = _shardings(frozen, mesh)
    abstract_opt = jax.eval_shape(self.tx.init, self._params)
    opt_sh = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, params_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    self.state_sharding = {"step": replicated, "params": params_sh, "opt_state": opt_sh,
                           "rng": replicated}
    self._abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32),
                      "params": jax.eval_shape(lambda p: p, self._params),
                      "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    shape = (self.accum, self.micro, self.seq_len)
    self.batch_sharding = sharding.named_sharding(mesh, (None, "batch", None), shape)
    self.local_rows = _local_rows(self.batch_sharding, shape)
    self.step_fn = jax.jit(
        functools.partial(_train_step, graphdef=self.graphdef, tx=self.tx,
                          schedule=self.schedule),
        in_shardings=(self.state_sharding, self.frozen_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, replicated), donate_argnums=(0,))
    self.frozen = jax.device_put(self.frozen, self.frozen_sharding)

  def init_state(self, restored: Any = None) -> dict:
    """`restored` (a state from a checkpoint) if given, else step 0: the model's trainable
    values, fresh optimizer state and the seed's rng. Either way the trainer then drops its
    reference to the model's initial values, so they are not held next to the state."""
    params, self._params = self._params, None
    if restored is not None:
      return restored
    if params is None:
      raise RuntimeError("init_state() may be called once per Trainer")
    params = jax.device_put(params, self.state_sharding["params"])
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding["opt_state"])(params)
    rng = jax.random.key_data(jax.random.key(self.seed)).astype(jnp.uint32)
    put = lambda x: jax.device_put(x, NamedSharding(self.mesh, P()))
    return {"step": put(jnp.zeros((), jnp.int32)), "params": params, "opt_state": opt_state,
            "rng": put(rng)}

  def abstract_state(self) -> Any:
    """ShapeDtypeStructs with this mesh's shardings: the target for restoring a checkpoint."""
    return checkpoint.abstract(self._abstract, self.state_sharding)

  def device_batch(self, batch: train_data.Batch) -> dict[str, jax.Array]:
    """Host rows (this process's `local_rows` of the global batch) -> global sharded arrays."""
    shape = (self.accum, self.micro, self.seq_len)
    out = {}
    for name, value in batch.arrays().items():
      local = value.reshape(self.accum, -1, self.seq_len)
      out[name] = jax.make_array_from_process_local_data(self.batch_sharding, local, shape)
    return out

  def step(self, state, batch):
    with jax.transfer_guard("disallow"):  # Every input must already be on device.
      return self.step_fn(state, self.frozen, batch)

  def model(self, state) -> nnx.Module:
    """The model with the state's parameters (shares arrays with `state`)."""
    return nnx.merge(self.graphdef, state["params"], self.frozen)


def _local_rows(batch_sharding: NamedSharding, shape: tuple[int, int, int]) -> list[int]:
  """Indices (into the flattened [accum * micro] global batch) this process must supply."""
  idx = batch_sharding.addressable_devices_indices_map(shape).values()
  starts = [s[1].start or 0 for s in idx]
  stops = [s[1].stop if s[1].stop is not None else shape[1] for s in idx]
  lo, hi = min(starts), max(stops)
  return [a * shape[1] + r for a in range(shape[0]) for r in range(lo, hi)]


# ------------------------------------------------------------------------------ throughput


def flops_per_token(config, seq_len: int, method: str) -> float:
  """Model FLOPs per trained token (the MFU numerator).

  Full: 6 * N + 12 * layers * q_dim * seq_len (forward 2N + backward 4N; attention scores and
  values, 2 * 2 * layers * q_dim * seq_len forward, times 3). LoRA skips the base weights'
  gradients: 4 * N + 8 * layers * q_dim * seq_len. N counts matmul weights: every parameter
  except an untied input embedding (a lookup) and the adapters themselves.
  """
  n = config.num_params()
  if not config.tie_word_embeddings:
    n -= config.vocab_size * config.hidden_size
  attn = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
  passes = 3 if method == "full" else 2
  return passes * (2 * n + attn)


def peak_flops(device_kind: str, configured: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: configured, else the PEAK_FLOPS entry, else None (CPU)."""
  if configured > 0:
    return float(configured)
  matches = [k for k in PEAK_FLOPS if k.lower() in device_kind.lower()]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


# ------------------------------------------------------------------------------ loop


@dataclasses.dataclass
class TrainResult:
  step: int  # Optimizer steps done (the last checkpoint's step).
  metrics: dict  # The last metrics row.
  model: nnx.Module  # Trained, in eval mode (LoRA adapters unmerged; save_hf merges them).
  preempted: bool  # Stopped by SIGTERM/preemption after saving.
  checkpoint_dir: str


class _Preemption:
  """Turns SIGTERM into a flag checked after each step (single process; multi-host runs use
  JAX's preemption sync point so every host stops at the same step)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # Not the main thread.
        self._previous = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("train: SIGTERM received; saving a checkpoint after this step")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _prepare_model(model_or_path, t: ml_collections.ConfigDict, mesh: Mesh) -> nnx.Module:
  """Loads (or copies) the model onto the mesh and adds LoRA adapters if configured.

  From a path, weights are read straight into their shards: with LoRA the frozen base is kept
  in the compute dtype (no master copy is needed), with full training in param_dtype. A model
  object is copied (the caller's is left untouched) and placed on the mesh as built.
  """
  if isinstance(model_or_path, (str, os.PathLike)):
    base_dtype = t.dtype if t.method == "lora" else t.param_dtype
    model, _ = hf_io.load_hf(model_or_path, mesh=mesh, dtype=t.dtype, param_dtype=base_dtype)
  else:
    model = nnx.clone(model_or_path)
    for _, module in nnx.iter_modules(model):
      if hasattr(module, "mesh"):
        module.mesh = mesh
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      value = var.get_value()  # Copied: the train step donates its buffers.
      var.set_value(jax.device_put(value, hf_io.param_sharding(var, value.shape, mesh),
                                   may_alias=False))
  model.remat = bool(t.remat)
  if t.method == "lora" and not lora.has_lora(model):
    lora.apply_lora(model, rank=t.lora.rank, alpha=t.lora.alpha, dropout=t.lora.dropout,
                    targets=t.lora.targets, param_dtype=jnp.dtype(t.param_dtype), seed=t.seed)
  return model


class _MetricsLog:
  """Append-only workdir/train/metrics.jsonl (process 0), one row per log step.

  A resumed run first rewinds it to the restored step: rows logged after the last checkpoint
  (and a torn last line) are dropped, so the steps trained again are not logged twice."""

  def __init__(self, path: str):
    self.path = path
    self.writer = jax.process_index() == 0
    if self.writer:
      os.makedirs(os.path.dirname(path), exist_ok=True)

  def rows(self) -> list[dict]:
    """The complete rows (a torn last line of a killed writer is not one)."""
    return appendlog.records(self.path)

  def rewind(self, step: int) -> None:
    """Keeps the rows up to `step` (atomically rewritten only when something goes)."""
    if not self.writer or not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      text = f.read()
    keep = [r for r in self.rows() if r["step"] <= step]
    new = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
    if new != text:
      logging.warning("train: %s: dropped rows after step %d (logged after the last "
                      "checkpoint of an interrupted run)", self.path, step)
      appendlog.write_atomic(self.path, new)

  def write(self, row: dict) -> None:
    if self.writer:
      appendlog.append(self.path, [row], "train.log")

  def last(self) -> dict:
    """The newest complete row ({} if none), e.g. for a run that had already finished."""
    rows = self.rows()
    return rows[-1] if rows else {}


def train(model: str | os.PathLike | nnx.Module, tokenizer, task: str | Task,
          rows_by_source: Mapping[str, Sequence[dict]], config, workdir: str | os.PathLike,
          mesh: Mesh | None = None) -> TrainResult:
  """Fine-tunes `model` on the mixture and returns the final step, metrics and model.

  rows_by_source: {'en': rows, 'translated': rows, 'code_switched': rows} in the task schema
  (see train_data.rows_for_variant). Resumes from workdir/checkpoints when it holds a
  checkpoint; a finished run returns at once. Writes workdir/train/metrics.jsonl. On SIGTERM
  it saves and returns with preempted=True; on a non-finite loss it raises
  NonFiniteLossError and leaves the last good checkpoint in place.
  """
  cfg = validate(config)
  t, c = cfg.train, cfg.checkpoint
  workdir = os.path.abspath(os.fspath(workdir))
  mesh = mesh if mesh is not None else sharding.make_mesh()
  task = get_task(task) if isinstance(task, str) else task
  examples = train_data.tokenize(task, rows_by_source, tokenizer, t.seq_len)
  data = train_data.BatchIterator(examples, batch_size=t.batch_size, seq_len=t.seq_len,
                                  packing=t.packing, weights=t.mixture.to_dict(), seed=t.seed)
  total = t.steps or sum(data.batches_in_epoch(e) for e in range(t.epochs))
  sizes = {s: len(examples.indices(s)) for s in examples.sources}
  logging.info("train: %d examples (%s), %d steps of %d x %d tokens", len(examples.tokens),
               ", ".join(f"{k}={v}" for k, v in sizes.items()), total, t.batch_size,
               t.seq_len)

  model = _prepare_model(model, t, mesh)
  model.train()
  model_config = getattr(model, "config", None)
  trainer = Trainer(model, t, mesh, total)
  del model  # The trainer holds what is needed; the initial values go once a state exists.
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every=c.every,
                                 keep=c.keep, async_save=c.async_save)
  restored = ckpts.restore(trainer.abstract_state(), settings={"train": t.to_dict()})
  if restored is None:
    state, step = trainer.init_state(), 0
  else:
    step, state, meta = restored
    state = trainer.init_state(state)
    data.restore(meta["data"])
    logging.info("train: resumed from step %d (epoch %d, batch %d)", step, data.epoch,
                 data.position)
    if meta.get("examples", sizes) != sizes:
      logging.warning("train: the training data changed since step %d was saved (examples "
                      "per source %s, now %s); training continues, but not in the order an "
                      "uninterrupted run would have used", step, meta.get("examples"), sizes)

  fpt = flops_per_token(model_config, t.seq_len, t.method) if model_config else None
  peak = peak_flops(jax.devices()[0].device_kind, t.peak_flops)
  log = _MetricsLog(os.path.join(workdir, "train", "metrics.jsonl"))
  log.rewind(step)
  row = log.last() if step >= total else {}
  window = {"loss": [], "time": 0.0, "tokens": 0}
  bar = tqdm(total=total, initial=step, unit="step", desc="train", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  preempted = False
  first = True
  try:
    with _Preemption() as preemption:
      while step < total:
        start = time.perf_counter()
        batch = trainer.device_batch(data.next(trainer.local_rows))
        state, metrics = trainer.step(state, batch)
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - start
        step += 1
        faults.point("train.step")
        loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(gnorm) and metrics["params_finite"]):
          ckpts.wait()
          raise NonFiniteLossError(
              f"train: non-finite values at step {step} (loss={loss}, grad_norm={gnorm}, "
              f"params finite={bool(metrics['params_finite'])}); stopped without saving this "
              f"state. Last good checkpoint: step {ckpts.latest_step()} in {ckpts.directory}. "
              "Lower train.lr or check the data, then rerun to resume from it.")
        window["loss"].append(loss)
        if not first:  # The first step of a process includes compilation.
          window["time"] += elapsed
          window["tokens"] += int(metrics["tokens"])
        first = False
        bar.update(1)
        if step % t.log_every == 0 or step == total:
          row = _row(step, data, metrics, window, fpt, peak, jax.device_count())
          if step == total:  # What train.seq_len cut, per source and language ({}: nothing).
            row["seq_len_cut"] = examples.cut
          log.write(row)
          bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}",
                          tok_s=f"{row['tokens_per_s'] or 0:.0f}")
          window = {"loss": [], "time": 0.0, "tokens": 0}
        meta = {"data": data.state, "step": step, "examples": sizes, "train": t.to_dict()}
        if ckpts.save(step, state, meta, force=step == total):
          faults.point("train.save_started")
        if step < total and (preemption.requested or ckpts.reached_preemption(step)):
          ckpts.save(step, state, meta, force=True)
          logging.warning("train: preempted; saved step %d to %s", step, ckpts.directory)
          preempted = True
          break
    ckpts.wait()
  finally:
    bar.close()
    ckpts.close()
  trained = trainer.model(state)
  trained.eval()  # Dropout off for whoever decodes with it.
  return TrainResult(step=step, metrics=row, model=trained, preempted=preempted,
                     checkpoint_dir=ckpts.directory)


def _row(step, data, metrics, window, fpt, peak, n_devices) -> dict:
  tps = window["tokens"] / window["time"] if window["time"] > 0 else None
  mfu = fpt * tps / (peak * n_devices) if (tps and fpt and peak) else None
  return {"step": step, "epoch": data.epoch, "loss": float(metrics["loss"]),
          "loss_mean": float(np.mean(window["loss"])), "lr": float(metrics["lr"]),
          "grad_norm": float(metrics["grad_norm"]), "tokens": int(metrics["tokens"]),
          "target_tokens": int(metrics["target_tokens"]), "tokens_per_s": tps, "mfu": mfu,
          "time": time.time()}


def load_trained(model: str | os.PathLike | nnx.Module, workdir: str | os.PathLike, config,
                 mesh: Mesh | None = None, step: int | None = None, *, merge: bool = False
                 ) -> tuple[nnx.Module, int]:
  """(model with a checkpoint's weights, its step): the latest (or `step`) of
  workdir/checkpoints, in eval mode.

  The model is exactly the one that was trained: the same compute dtype and, for LoRA, the
  frozen base plus the float32 adapters, unmerged. Folding small adapter updates into bf16
  kernels rounds many of them away, so evaluation must not score a merged copy. `merge=True`
  returns the merged copy (what `save_hf` writes; it merges by itself too).
  """
  cfg = validate(config)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  m = _prepare_model(model, cfg.train, mesh)
  trainer = Trainer(m, cfg.train, mesh, total_steps=1)
  ckpts = checkpoint.Checkpoints(os.path.join(os.fspath(workdir), "checkpoints"),
                                 read_only=True)
  try:
    restored = ckpts.restore(trainer.abstract_state(), step,
                             settings={"train": cfg.train.to_dict()})
  finally:
    ckpts.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {ckpts.directory}; run the train stage first")
  out = trainer.model(trainer.init_state(restored[1]))
  out.eval()
  return (lora.merged_for_export(out) if merge else out), restored[0]
