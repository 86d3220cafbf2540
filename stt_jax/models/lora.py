"""LoRA adapters on the decoder's projections: wrap, merge, export.

`apply_lora` swaps each targeted `nnx.Linear` (q_proj, ..., down_proj) for `LoRALinear`, an
`nnx.LoRA` that keeps the original Linear as its frozen `base_module` and adds
`scale * dropout(x) @ lora_a @ lora_b` with scale = alpha / rank. The adapters are
`nnx.LoRAParam`s, so an optimizer over the `nnx.LoRAParam` filter holds no state for the base.
They carry logical axes derived from the base kernel's (`lora_a`: (in, None), `lora_b`:
(None, out)), so they shard like the weights they adapt. `merge` folds the adapters back into
plain Linears (in float32, then cast), which is what `save_hf` exports.

On a scanned model (`CausalLM(scan_layers=True)`) each targeted Linear is stacked (kernel
[layers, in, out]), and so are its adapters: lora_a [layers, in, r], lora_b [layers, r, out],
logical axes ("layers", ...). Adapter dropout keys are fold_in(fold_in(key, layer), projection)
in both layouts: an unrolled adapter knows its layer, a stacked one gets it from the scan
(`fold_in_layer`), so both layouts draw the same masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes

# Projections of the Llama-family decoder that LoRA may adapt.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DropoutKey(nnx.Variable):
  """The step's dropout key (raw uint32 key data), one Variable shared by every adapter.

  The train step writes it once per micro-batch; each adapter folds in its layer and its
  projection's index, so dropout masks are a pure function of (seed, step, micro-batch, layer,
  projection) and resume exactly.
  """


class LoRALinear(nnx.LoRA):
  """A frozen `nnx.Linear` (`base_module`) plus a scaled low-rank update."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float,
               index: int, layer: int | None, key: DropoutKey, param_dtype, rngs: nnx.Rngs):
    """index: the projection's position in TARGETS; layer: its layer (None for a stacked
    Linear, whose layer the scan supplies through the dropout key: `fold_in_layer`)."""
    kernel_axes = tuple(base.kernel.get_metadata().get("logical_axes", (None, None)))
    lead = ()
    a_init, b_init = nnx.initializers.he_uniform(), nnx.initializers.zeros_init()
    if kernel_axes[:1] == ("layers",):  # Stacked: one adapter per layer along dim 0.
      lead, n = ("layers",), base.kernel.get_value().shape[0]
      a_init = _stacked_init(a_init, n)
      b_init = _stacked_init(b_init, n)
    in_axis, out_axis = kernel_axes[-2:]
    super().__init__(
        base.in_features, rank, base.out_features, base_module=base, dtype=base.dtype,
        param_dtype=param_dtype, rngs=rngs, a_initializer=a_init, b_initializer=b_init,
        a_metadata={"logical_axes": (*lead, in_axis, None)},
        b_metadata={"logical_axes": (*lead, None, out_axis)})
    self.scale = float(alpha) / rank
    self.dropout = nnx.Dropout(dropout, deterministic=True)  # `model.train()` enables it.
    self.index = index
    self.layer = layer
    self.dropout_key = key

  def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
    y = self.base_module(x, **kwargs)
    h = x
    if self.dropout.rate > 0 and not self.dropout.deterministic:
      key = self.dropout_key[...]
      if self.layer is not None:
        key = jax.random.fold_in(key, self.layer)
      h = self.dropout(x, rngs=jax.random.fold_in(key, self.index))
    h, a, b = dtypes.promote_dtype((h, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    return y + (h @ a @ b) * jnp.asarray(self.scale, h.dtype)


def _stacked_init(init, n: int):
  """`init` of a [in, out] matrix -> n independent draws stacked to [n, in, out]."""
  def stacked(key, shape, dtype=jnp.float32):
    return jax.vmap(lambda k: init(k, shape, dtype))(jax.random.split(key, n))
  return stacked


def fold_in_layer(module: nnx.Module, layer: jax.Array) -> None:
  """Inside the layer scan: folds the (traced) layer index into the dropout key the adapters
  of `module` (one layer, just merged from the stacked state) share. No-op without adapters."""
  for _, m in nnx.iter_modules(module):
    if isinstance(m, LoRALinear):
      m.dropout_key.set_value(jax.random.fold_in(m.dropout_key[...], layer))
      return


def _layer_of(path) -> int | None:
  """The layer index of a module path `model.layers.<i>...` (None when stacked / elsewhere)."""
  path = tuple(path)
  if len(path) > 2 and path[:2] == ("model", "layers") and isinstance(path[2], int):
    return path[2]
  return None


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  """'q_proj,v_proj' (or a sequence, or 'all') -> validated tuple of projection names."""
  if isinstance(targets, str):
    targets = TARGETS if targets.strip() == "all" else [
        t.strip() for t in targets.split(",") if t.strip()]
  targets = tuple(targets)
  unknown = [t for t in targets if t not in TARGETS]
  if unknown or not targets:
    raise ValueError(f"lora targets: unknown projection(s) {unknown or targets}; choose from "
                     f"{', '.join(TARGETS)} (comma separated) or 'all'")
  return targets


def _slots(model: nnx.Module, names: Iterable[str], kind: type, with_path: bool = False):
  """(parent module, attribute) of every `kind` submodule stored under one of `names`
  (plus the parent's path with `with_path`)."""
  names = tuple(names)
  for path, module in nnx.iter_modules(model):
    for name in names:
      if isinstance(getattr(module, name, None), kind):
        yield (module, name, path) if with_path else (module, name)


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, dropout: float = 0.0,
               targets: str | Sequence[str] = TARGETS, param_dtype=jnp.float32,
               seed: int = 0) -> nnx.Module:
  """Wraps the targeted Linears of `model` in place (and returns it).

  lora_a is initialised He-uniform and lora_b with zeros, so the adapted model starts exactly
  at the base model. Adapters are placed like their base kernels when those are sharded.
  """
  if rank <= 0:
    raise ValueError(f"lora rank must be positive, got {rank}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"lora dropout must be in [0, 1), got {dropout}")
  if has_lora(model):
    raise ValueError("model already has LoRA adapters")
  rngs = nnx.Rngs(params=seed)
  key = DropoutKey(jax.random.key_data(jax.random.key(seed)))
  slots = list(_slots(model, parse_targets(targets), nnx.Linear, with_path=True))
  if not slots:
    raise ValueError(f"no Linear named {', '.join(parse_targets(targets))} in the model")
  for parent, name, path in slots:
    base = getattr(parent, name)
    wrapped = LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout,
                         index=TARGETS.index(name), layer=_layer_of(path), key=key,
                         param_dtype=param_dtype, rngs=rngs)
    kernel_sharding = getattr(base.kernel.get_value(), "sharding", None)
    if isinstance(kernel_sharding, jax.sharding.NamedSharding):
      _place_like(wrapped, kernel_sharding)
    setattr(parent, name, wrapped)
  return model


def _place_like(layer: LoRALinear, kernel_sharding: jax.sharding.NamedSharding) -> None:
  """Puts lora_a/lora_b on the kernel's mesh, split along its input / output axes (and like
  its leading layers axis when stacked)."""
  ndim = layer.base_module.kernel.get_value().ndim
  spec = tuple(kernel_sharding.spec) + (None,) * (ndim - len(kernel_sharding.spec))
  mesh = kernel_sharding.mesh
  P = jax.sharding.PartitionSpec
  lead = spec[:-2]
  for var, part in ((layer.lora_a, P(*lead, spec[-2], None)),
                    (layer.lora_b, P(*lead, None, spec[-1]))):
    sharded = jax.sharding.NamedSharding(mesh, part)
    var.set_value(jax.device_put(np.asarray(var.get_value()), sharded))


def adapters(model: nnx.Module) -> Iterator[tuple[tuple, LoRALinear]]:
  """(module path, adapter) of every LoRALinear of `model`, in model order."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, LoRALinear):
      yield tuple(path), module


def has_lora(model: nnx.Module) -> bool:
  return any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model))


def set_dropout_key(model: nnx.Module, key_data: jax.Array) -> None:
  """Sets the shared dropout key (raw uint32 key data) of every adapter."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, LoRALinear):
      module.dropout_key.set_value(key_data)
      return


@jax.jit
def _merged_kernel(kernel, a, b, scale):
  merged = kernel.astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
  return merged.astype(kernel.dtype)


def merge(model: nnx.Module) -> nnx.Module:
  """A copy of `model` with every adapter folded into its base kernel (float32 math, then the
  kernel's dtype) and the wrappers replaced by plain Linears; `model` itself is unchanged."""
  merged = nnx.clone(model)
  for parent, name in list(_slots(merged, TARGETS, LoRALinear)):
    layer: LoRALinear = getattr(parent, name)
    base = layer.base_module
    kernel = base.kernel.get_value()
    new = _merged_kernel(kernel, layer.lora_a.get_value(), layer.lora_b.get_value(),
                         jnp.float32(layer.scale))
    if hasattr(kernel, "sharding"):
      new = jax.device_put(new, kernel.sharding)
    base.kernel.set_value(new)
    setattr(parent, name, base)
  return merged


def merged_for_export(model: nnx.Module) -> nnx.Module:
  """The model `save_hf` should write: merged if it has adapters, else itself."""
  return merge(model) if has_lora(model) else model
