"""Fine-tuning: the train state, the sharded jit step (full or LoRA), and the resumable loop.

  cfg = run_config.get_config(); run_config.validate(cfg)   # the caller validates
  result = train("path/to/hf_model", tokenizer, "mgsm", {"en": rows, "translated": rows_de},
                 cfg, workdir, mesh)          # resumes from workdir/checkpoints
  model, step = load_trained("path/to/hf_model", workdir, cfg, mesh)   # weights only
  save_hf(result.model, model_config, out_dir)   # LoRA is merged on export

The config is used as given (its `train` and `checkpoint` sections); defaults and checks live
in `run_config`. The step is one `jax.jit` over the mesh: in/out shardings come from the
parameters' logical axes (optimizer state sharded like its parameter), the `TrainState` is
donated, gradient accumulation is a `lax.scan` over micro-batches, and the loss
(`loss.token_loss_sum`) is the mean over target tokens of the whole global batch (so
accumulation equals one big batch). Only the trainable variables (all `nnx.Param`s, or only
`nnx.LoRAParam`s) are differentiated and carry AdamW state; frozen base weights are a
separate, non-donated argument. Evaluation (`load_trained`) splits the model the same way and
restores the trainable weights alone: no optimizer is built and no optimizer state is read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from stt_jax import appendlog, checkpoint, faults, flops, sharding, tensorboard, train_data
from stt_jax.loss import token_loss_sum
from stt_jax.models import hf_io, lora, peft_io
from stt_jax.tasks import Task, get_task

if TYPE_CHECKING:  # Annotations only: the step imports without ml_collections (GPU images).
  import ml_collections


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss, gradient or parameter; that state was not saved."""


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes, as one donated pytree of arrays.

  On disk it is the plain dict {step, params, opt_state, rng} (`as_dict` / `from_dict`), the
  format checkpoints have always had, so older ones restore and eval can read "params" alone.
  """

  step: Any  # int32 scalar: optimizer steps done.
  params: Any  # Pure dict of the trainable variables (float param_dtype).
  opt_state: Any  # The optax state of `params`, each moment sharded like its parameter.
  rng: Any  # uint32[2] key data; each step folds in its step number (dropout).

  def as_dict(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, tree: Mapping[str, Any]) -> TrainState:
    return cls(**tree)


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


def _micro_grads(params, frozen, micro, key, graphdef, target_width=None):
  """Gradient of the summed target-token loss of one micro-batch w.r.t. `params`."""

  def loss_fn(p):
    model = nnx.merge(graphdef, p, frozen)
    lora.set_dropout_key(model, key)
    total, count = token_loss_sum(model, micro, target_width=target_width)
    return total, count

  (total, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return total, count, grads


def loss_and_grads(params, frozen, batch, key, *, graphdef, target_width=None):
  """Mean target-token loss and its gradient over a batch of [accum, micro, L] arrays;
  `target_width`: see `loss.token_loss_sum`."""
  accum = batch["inputs"].shape[0]
  keys = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(
      jax.random.wrap_key_data(key), i)))(jnp.arange(accum))
  if accum == 1:
    total, count, grads = _micro_grads(params, frozen, jax.tree.map(lambda x: x[0], batch),
                                       keys[0], graphdef, target_width)
  else:
    def body(carry, xs):
      micro, k = xs
      t, c, g = _micro_grads(params, frozen, micro, k, graphdef, target_width)
      return jax.tree.map(jnp.add, carry, (t, c, g)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(jnp.zeros_like, params))
    (total, count, grads), _ = jax.lax.scan(body, zeros, (batch, keys))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
  return total / denom, count, grads


def _train_step(state: TrainState, frozen, batch, *, graphdef, tx, schedule,
                target_width=None):
  key = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                               state.step))
  loss, count, grads = loss_and_grads(state.params, frozen, batch, key, graphdef=graphdef,
                                      target_width=target_width)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
             "target_tokens": count, "tokens": jnp.sum(batch["segment_ids"] > 0),
             "params_finite": finite}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _nest(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for keys, value in flat.items():
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return out


def _shardings(state: nnx.State, mesh: Mesh, layout: str = "train") -> dict:
  """Pure-dict tree of NamedShardings from each variable's logical axes (else replicated)."""
  flat = {}
  for keys, var in nnx.to_flat_state(state):
    shape = tuple(var.get_value().shape)
    axes = var.get_metadata().get("logical_axes")
    if axes is None or len(axes) != len(shape):
      flat[keys] = NamedSharding(mesh, P())
    else:
      flat[keys] = sharding.named_sharding(mesh, axes, shape, layout)
  return _nest(flat)


def split_trainable(model: nnx.Module, method: str
                    ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable, frozen): what training differentiates and what eval restores."""
  trainable = nnx.LoRAParam if method == "lora" else nnx.Param
  return nnx.split(model, trainable, ...)


def abstract_params(params: nnx.State, mesh: Mesh, layout: str = "train") -> dict:
  """ShapeDtypeStructs of the trainable values with their mesh shardings: the "params" of
  the train state's restore target, and eval's whole restore target."""
  return checkpoint.abstract(nnx.to_pure_dict(params), _shardings(params, mesh, layout))


class Trainer:
  """The model split into (graphdef, trainable, frozen), the optimizer, and the jitted step.

  The state is a `TrainState` (params: a pure dict of the trainable variables); its
  `as_dict()` is exactly what a checkpoint holds.
  """

  def __init__(self, model: nnx.Module, t: ml_collections.ConfigDict, mesh: Mesh,
               total_steps: int, target_width: int | None = None):
    """target_width: most target tokens in any row (`Examples.target_width`); the loss then
    projects the LM head at that many positions per row, not at all seq_len."""
    self.mesh = mesh
    self.accum = t.grad_accum
    self.micro = t.batch_size // t.grad_accum
    self.seq_len = t.seq_len
    self.seed = t.seed
    self.graphdef, params, frozen = split_trainable(model, t.method)
    self._params = nnx.to_pure_dict(params)
    self.frozen_sharding = _shardings(frozen, mesh)
    self.frozen = jax.device_put(nnx.to_pure_dict(frozen), self.frozen_sharding)
    self.tx, self.schedule = make_optimizer(t, total_steps)
    self._abstract = self._layout(abstract_params(params, mesh))
    self.state_sharding = jax.tree.map(lambda a: a.sharding, self._abstract)
    shape = (self.accum, self.micro, self.seq_len)
    self.batch_sharding = sharding.named_sharding(mesh, (None, "batch", None), shape)
    self.local_rows = _local_rows(self.batch_sharding, shape)
    replicated = NamedSharding(mesh, P())
    self.step_fn = jax.jit(
        functools.partial(_train_step, graphdef=self.graphdef, tx=self.tx,
                          schedule=self.schedule, target_width=target_width),
        in_shardings=(self.state_sharding, self.frozen_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, replicated), donate_argnums=(0,))

  def _layout(self, params: dict) -> TrainState:
    """The abstract train state (ShapeDtypeStructs with shardings) around abstract params:
    each optimizer moment sharded like its parameter, counters and rng replicated."""
    replicated = NamedSharding(self.mesh, P())
    opt = jax.eval_shape(self.tx.init, params)
    opt_sh = optax.tree_map_params(
        self.tx, lambda _, p: p.sharding, opt, params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    scalar = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    return TrainState(step=scalar((), jnp.int32), params=params,
                      opt_state=checkpoint.abstract(opt, opt_sh),
                      rng=scalar((2,), jnp.uint32))

  def init_state(self, restored: TrainState | None = None) -> TrainState:
    """`restored` (a state from a checkpoint) if given, else step 0: the model's trainable
    values, fresh optimizer state and the seed's rng. Either way the trainer then drops its
    reference to the model's initial values, so they are not held next to the state."""
    params, self._params = self._params, None
    if restored is not None:
      return restored
    if params is None:
      raise RuntimeError("init_state() may be called once per Trainer")
    params = jax.device_put(params, self.state_sharding.params)
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(params)
    rng = jax.random.key_data(jax.random.key(self.seed)).astype(jnp.uint32)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.state_sharding.step),
                      params=params, opt_state=opt_state,
                      rng=jax.device_put(rng, self.state_sharding.rng))

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with this mesh's shardings: the target for restoring a checkpoint."""
    return self._abstract

  def restore(self, ckpts: checkpoint.Checkpoints, step: int | None = None,
              settings: Mapping[str, Mapping] | None = None
              ) -> tuple[int, TrainState, dict] | None:
    """`ckpts.restore` onto this trainer's state: (step, state, meta), or None."""
    found = ckpts.restore(self._abstract.as_dict(), step, settings)
    if found is None:
      return None
    s, tree, meta = found
    return s, TrainState.from_dict(tree), meta

  def device_batch(self, batch: train_data.Batch) -> dict[str, jax.Array]:
    """Host rows (this process's `local_rows` of the global batch) -> global sharded arrays."""
    shape = (self.accum, self.micro, self.seq_len)
    out = {}
    for name, value in batch.arrays().items():
      local = value.reshape(self.accum, -1, self.seq_len)
      out[name] = jax.make_array_from_process_local_data(self.batch_sharding, local, shape)
    return out

  def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    with jax.transfer_guard("disallow"):  # Every input must already be on device.
      return self.step_fn(state, self.frozen, batch)

  def model(self, state: TrainState) -> nnx.Module:
    """The model with the state's parameters (shares arrays with `state`)."""
    return nnx.merge(self.graphdef, state.params, self.frozen)


def _local_rows(batch_sharding: NamedSharding, shape: tuple[int, int, int]) -> list[int]:
  """Indices (into the flattened [accum * micro] global batch) this process must supply."""
  idx = batch_sharding.addressable_devices_indices_map(shape).values()
  starts = [s[1].start or 0 for s in idx]
  stops = [s[1].stop if s[1].stop is not None else shape[1] for s in idx]
  lo, hi = min(starts), max(stops)
  return [a * shape[1] + r for a in range(shape[0]) for r in range(lo, hi)]


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


def scan_layers(config) -> bool:
  """The run config's `model.scan_layers` (True when the config has no model section)."""
  model = config.get("model") if hasattr(config, "get") else getattr(config, "model", None)
  return bool(model.get("scan_layers", True)) if model is not None else True


def attention(config) -> str:
  """The run config's `model.attention` ('auto' when the config has no model section)."""
  model = config.get("model") if hasattr(config, "get") else getattr(config, "model", None)
  return str(model.get("attention", "auto")) if model is not None else "auto"


def model_settings(model: nnx.Module) -> dict:
  """The model settings a checkpoint's tree depends on (saved in its meta)."""
  return {"scan_layers": bool(getattr(model, "scan_layers", False))}


def _prepare_model(model_or_path, t: ml_collections.ConfigDict, mesh: Mesh,
                   layout: str = "train", scan: bool = True,
                   attention_impl: str = "auto") -> nnx.Module:
  """Loads (or copies) the model onto the mesh and adds LoRA adapters if configured.

  From a path, weights are read straight into their shards: with LoRA the frozen base is kept
  in the compute dtype (no master copy is needed), with full training in param_dtype, except
  in the 'inference' layout (decoding a trained model), where no master copy is needed
  either; `scan` is model.scan_layers (stacked, scanned layers), `attention_impl`
  model.attention. A model object is copied (the caller's is left untouched) and placed on
  the mesh as built, in its own layout (scan and attention included).
  """
  if isinstance(model_or_path, (str, os.PathLike)):
    base_dtype = t.dtype if t.method == "lora" or layout == "inference" else t.param_dtype
    model, _ = hf_io.load_hf(model_or_path, mesh=mesh, dtype=t.dtype, param_dtype=base_dtype,
                             layout=layout, scan_layers=scan, attention=attention_impl)
  else:
    model = nnx.clone(model_or_path)
    for _, module in nnx.iter_modules(model):
      if hasattr(module, "mesh"):
        module.mesh = mesh
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      value = var.get_value()  # Copied: the train step donates its buffers.
      var.set_value(jax.device_put(value, hf_io.param_sharding(var, value.shape, mesh, layout),
                                   may_alias=False))
  model.remat = bool(t.remat)
  if t.method == "lora" and not lora.has_lora(model):
    if t.lora.get("init_adapter"):  # Training goes on from a PEFT adapter.
      peft_io.load_peft(model, t.lora.init_adapter, seed=t.seed)
    else:
      lora.apply_lora(model, rank=t.lora.rank, alpha=t.lora.alpha, dropout=t.lora.dropout,
                      targets=t.lora.targets, param_dtype=jnp.dtype(t.param_dtype),
                      seed=t.seed)
  return model


class _MetricsLog:
  """Append-only workdir/train/metrics.jsonl (process 0), one row per log step, and with
  `events` the same rows as TensorBoard scalars in an event file beside it.

  A resumed run first rewinds both to the restored step: rows logged after the last checkpoint
  (and a torn last line) are dropped, so the steps trained again are not logged twice."""

  def __init__(self, path: str, events: bool = False):
    self.path = path
    self.writer = jax.process_index() == 0
    self.events = tensorboard.EventFile(os.path.dirname(path)) if events else None
    if self.writer:
      os.makedirs(os.path.dirname(path), exist_ok=True)

  def rows(self) -> list[dict]:
    """The complete rows (a torn last line of a killed writer is not one)."""
    return appendlog.records(self.path)

  def rewind(self, step: int) -> None:
    """Keeps the rows up to `step` (atomically rewritten only when something goes)."""
    if self.events:
      self.events.rewind(step)
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
    if self.events:
      self.events.append([(row["step"], row["time"], tensorboard.train_scalars(row))])

  def last(self) -> dict:
    """The newest complete row ({} if none), e.g. for a run that had already finished."""
    rows = self.rows()
    return rows[-1] if rows else {}


@dataclasses.dataclass
class _Run:
  """What the loop reads besides the state, built once by `train`."""
  t: ml_collections.ConfigDict
  trainer: Trainer
  examples: train_data.Examples
  data: train_data.BatchIterator
  total: int  # Optimizer steps of the whole run.
  ckpts: checkpoint.Checkpoints
  log: _MetricsLog
  flops_per_token: float | None
  peak_flops: float | None
  # The model settings a checkpoint's layout depends on (saved in its meta, so restoring
  # into the other layout names the one that changed): {"scan_layers": bool}.
  model_settings: dict = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def sizes(self) -> dict[str, int]:
    """Examples per source: saved with each checkpoint to notice changed data on resume."""
    return {s: len(self.examples.indices(s)) for s in self.examples.sources}

  @functools.cached_property
  def settings(self) -> dict:
    return self.t.to_dict()


class _Window:
  """Losses, time and tokens since the last log row. A process's first step includes the
  compilation, so its time and tokens are left out of the throughput."""

  def __init__(self):
    self.compiled = False
    self.reset()

  def reset(self) -> None:
    self.losses, self.time, self.tokens = [], 0.0, 0

  def add(self, metrics: Mapping[str, Any], elapsed: float) -> None:
    self.losses.append(float(metrics["loss"]))
    if self.compiled:
      self.time += elapsed
      self.tokens += int(metrics["tokens"])
    self.compiled = True

  def tokens_per_s(self) -> float | None:
    return self.tokens / self.time if self.time > 0 else None


def train(model: str | os.PathLike | nnx.Module, tokenizer, task: str | Task,
          rows_by_source: Mapping[str, Sequence[dict]], config, workdir: str | os.PathLike,
          mesh: Mesh | None = None) -> TrainResult:
  """Fine-tunes `model` on the mixture and returns the final step, metrics and model.

  config: the `train` and `checkpoint` sections of a validated run config, used as given.
  rows_by_source: {'en': rows, 'translated': rows, 'code_switched': rows} in the task schema
  (see train_data.rows_for_variant). Resumes from workdir/checkpoints when it holds a
  checkpoint; a finished run returns at once. Writes workdir/train/metrics.jsonl (and with
  logging.tensorboard an event file beside it: stt_jax.tensorboard). On SIGTERM
  it saves and returns with preempted=True; on a non-finite loss it raises
  NonFiniteLossError and leaves the last good checkpoint in place.
  """
  t, c = config.train, config.checkpoint
  workdir = os.path.abspath(os.fspath(workdir))
  mesh = mesh if mesh is not None else sharding.make_mesh()
  examples, data, total = _load_data(task, rows_by_source, tokenizer, t)
  model = _prepare_model(model, t, mesh, scan=scan_layers(config),
                         attention_impl=attention(config))
  model.train()
  settings = model_settings(model)
  model_config = getattr(model, "config", None)
  trainer = Trainer(model, t, mesh, total, target_width=examples.target_width(t.seq_len))
  del model  # The trainer holds what is needed; the initial values go once a state exists.
  run = _Run(
      t=t, trainer=trainer, examples=examples, data=data, total=total,
      ckpts=checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), every=c.every,
                                   keep=c.keep, async_save=c.async_save),
      log=_MetricsLog(os.path.join(workdir, "train", "metrics.jsonl"),
                      tensorboard.writer_on(config)),
      flops_per_token=(flops.flops_per_token(model_config, t.seq_len, t.method)
                       if model_config else None),
      peak_flops=flops.peak_flops(jax.devices()[0].device_kind, t.peak_flops),
      model_settings=settings)
  try:
    state, step = _restore_or_init(run)
    run.log.rewind(step)
    state, step, row, preempted = _run_steps(run, state, step)
  finally:
    run.ckpts.close()
  trained = trainer.model(state)
  trained.eval()  # Dropout off for whoever decodes with it.
  return TrainResult(step=step, metrics=row, model=trained, preempted=preempted,
                     checkpoint_dir=run.ckpts.directory)


def _load_data(task: str | Task, rows_by_source: Mapping[str, Sequence[dict]], tokenizer,
               t: ml_collections.ConfigDict
               ) -> tuple[train_data.Examples, train_data.BatchIterator, int]:
  """(tokenized examples, the mixture's batch iterator, the run's optimizer steps)."""
  task = get_task(task) if isinstance(task, str) else task
  examples = train_data.tokenize(task, rows_by_source, tokenizer, t.seq_len)
  data = train_data.BatchIterator(examples, batch_size=t.batch_size, seq_len=t.seq_len,
                                  packing=t.packing, weights=t.mixture.to_dict(), seed=t.seed)
  total = t.steps or sum(data.batches_in_epoch(e) for e in range(t.epochs))
  logging.info("train: %d examples (%s), %d steps of %d x %d tokens", len(examples.tokens),
               ", ".join(f"{s}={len(examples.indices(s))}" for s in examples.sources), total,
               t.batch_size, t.seq_len)
  return examples, data, total


def _restore_or_init(run: _Run) -> tuple[TrainState, int]:
  """(state, step) of the newest readable checkpoint, data position included; else step 0."""
  restored = run.trainer.restore(run.ckpts, settings={"train": run.settings,
                                                      "model": run.model_settings})
  if restored is None:
    return run.trainer.init_state(), 0
  step, state, meta = restored
  state = run.trainer.init_state(state)
  run.data.restore(meta["data"])
  logging.info("train: resumed from step %d (epoch %d, batch %d)", step, run.data.epoch,
               run.data.position)
  if meta.get("examples", run.sizes) != run.sizes:
    logging.warning("train: the training data changed since step %d was saved (examples "
                    "per source %s, now %s); training continues, but not in the order an "
                    "uninterrupted run would have used", step, meta.get("examples"),
                    run.sizes)
  return state, step


def _run_steps(run: _Run, state: TrainState, step: int
               ) -> tuple[TrainState, int, dict, bool]:
  """Trains from `step` to run.total, or until a preemption has been saved; returns (state,
  step, last metrics row, preempted). A finished run's row is the log's last one."""
  row = run.log.last() if step >= run.total else {}
  window, preempted = _Window(), False
  bar = tqdm(total=run.total, initial=step, unit="step", desc="train", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  try:
    with _Preemption() as preemption:
      while step < run.total and not preempted:
        start = time.perf_counter()
        batch = run.trainer.device_batch(run.data.next(run.trainer.local_rows))
        state, metrics = run.trainer.step(state, batch)
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - start
        step += 1
        faults.point("train.step")
        _check_finite(step, metrics, run.ckpts)
        window.add(metrics, elapsed)
        bar.update(1)
        if step % run.t.log_every == 0 or step == run.total:
          row = _log_row(run, step, metrics, window, bar)
        preempted = _save(run, step, state, preemption)
    run.ckpts.wait()
  finally:
    bar.close()
  return state, step, row, preempted


def _check_finite(step: int, metrics: Mapping[str, Any], ckpts: checkpoint.Checkpoints
                  ) -> None:
  """Raises NonFiniteLossError (after pending saves land) unless the step's values are finite."""
  loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
  if math.isfinite(loss) and math.isfinite(gnorm) and metrics["params_finite"]:
    return
  ckpts.wait()
  raise NonFiniteLossError(
      f"train: non-finite values at step {step} (loss={loss}, grad_norm={gnorm}, "
      f"params finite={bool(metrics['params_finite'])}); stopped without saving this "
      f"state. Last good checkpoint: step {ckpts.latest_step()} in {ckpts.directory}. "
      "Lower train.lr or check the data, then rerun to resume from it.")


def _log_row(run: _Run, step: int, metrics: Mapping[str, Any], window: _Window, bar) -> dict:
  """Writes the metrics row of `step` (the last one also gets what seq_len cut) and starts
  a new window."""
  tps = window.tokens_per_s()
  row = {"step": step, "epoch": run.data.epoch, "loss": float(metrics["loss"]),
         "loss_mean": float(np.mean(window.losses)), "lr": float(metrics["lr"]),
         "grad_norm": float(metrics["grad_norm"]), "tokens": int(metrics["tokens"]),
         "target_tokens": int(metrics["target_tokens"]), "tokens_per_s": tps,
         "mfu": flops.mfu(run.flops_per_token, tps, run.peak_flops, jax.device_count()),
         "time": time.time()}
  if step == run.total:  # What train.seq_len cut, per source and language ({}: nothing).
    row["seq_len_cut"] = run.examples.cut
  run.log.write(row)
  bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                  tok_s=f"{tps or 0:.0f}")
  window.reset()
  return row


def _save(run: _Run, step: int, state: TrainState, preemption: _Preemption) -> bool:
  """Saves `step` when due (always the last one); after a preemption request saves it now
  and returns True, so the loop stops."""
  meta = {"data": run.data.state, "step": step, "examples": run.sizes, "train": run.settings,
          "model": run.model_settings}
  if run.ckpts.save(step, state.as_dict(), meta, force=step == run.total):
    faults.point("train.save_started")
  if step < run.total and (preemption.requested or run.ckpts.reached_preemption(step)):
    run.ckpts.save(step, state.as_dict(), meta, force=True)
    logging.warning("train: preempted; saved step %d to %s", step, run.ckpts.directory)
    return True
  return False


# ------------------------------------------------------------------------------ eval


def weights_target(model: str | os.PathLike | nnx.Module, t: ml_collections.ConfigDict,
                   mesh: Mesh, layout: str = "train", scan: bool = True,
                   attention_impl: str = "auto") -> tuple[nnx.GraphDef, dict, dict]:
  """(graphdef, restore target of the trainable weights, frozen values): the model exactly
  as `train` prepares and splits it. The trainable values it was built with are dropped (a
  checkpoint replaces them); the frozen ones are placed as the Trainer places them (layout
  'train'), or over `tensor` only (layout 'inference', for decoding: sharding.LAYOUTS).
  scan, attention_impl: model.scan_layers and model.attention, for a model given by path.

  In the 'inference' layout fully fine-tuned weights are restored in the compute dtype
  (train.dtype), not as the float32 master copy: every layer casts its weights to the compute
  dtype before use, so the numbers are the same and a 7B model needs 13.5 GB per copy, not 27.
  LoRA adapters stay as trained (they are small)."""
  graphdef, params, frozen = split_trainable(
      _prepare_model(model, t, mesh, layout, scan, attention_impl), t.method)
  frozen = jax.device_put(nnx.to_pure_dict(frozen), _shardings(frozen, mesh, layout))
  target = abstract_params(params, mesh, layout)
  if layout == "inference" and t.method == "full":
    compute = jnp.dtype(t.dtype)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, compute if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
        sharding=a.sharding), target)
  return graphdef, target, frozen


def load_trained(model: str | os.PathLike | nnx.Module, workdir: str | os.PathLike, config,
                 mesh: Mesh | None = None, step: int | None = None, *, merge: bool = False,
                 layout: str = "train") -> tuple[nnx.Module, int]:
  """(model with a checkpoint's weights, its step): the latest (or `step`) of
  workdir/checkpoints, in eval mode. Reads the trainable weights only: no optimizer is
  built and no optimizer state is read or allocated.

  The model is exactly the one that was trained: the same compute dtype and, for LoRA, the
  frozen base plus the float32 adapters, unmerged. Folding small adapter updates into bf16
  kernels rounds many of them away, so evaluation must not score a merged copy. `merge=True`
  returns the merged copy (what `save_hf` writes; it merges by itself too). `layout`
  'inference' places the weights for decoding and scoring (over `tensor` only; the eval
  stage's choice), 'train' exactly as the Trainer holds them.
  """
  t = config.train
  mesh = mesh if mesh is not None else sharding.make_mesh()
  scan = (scan_layers(config) if isinstance(model, (str, os.PathLike))
          else bool(getattr(model, "scan_layers", False)))
  graphdef, target, frozen = weights_target(model, t, mesh, layout, scan, attention(config))
  ckpts = checkpoint.Checkpoints(os.path.join(os.fspath(workdir), "checkpoints"),
                                 read_only=True)
  try:
    restored = ckpts.restore_params(target, step, settings={
        "train": t.to_dict(), "model": {"scan_layers": scan}})
  finally:
    ckpts.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {ckpts.directory}; run the train stage first")
  out = nnx.merge(graphdef, restored[1], frozen)
  out.eval()
  return (lora.merged_for_export(out) if merge else out), restored[0]
