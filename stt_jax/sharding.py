"""Device mesh and the tables that map logical axis names onto it.

Modules name the axes of every weight and activation logically (`embed`, `heads`, `batch`, ...).
A rules table says which mesh axes each name is split over; nothing else in the code base
hard-codes a PartitionSpec. The same code then runs on 1 CPU device, 8 emulated CPU devices, a
GPU or a TPU slice: only the mesh changes.

Two layouts share the activation rules and differ in where weights live:
- `train` (LOGICAL_RULES): weights FSDP-sharded over `fsdp` (+ `tensor`), so optimizer state
  and master weights spread over every device;
- `inference` (INFERENCE_RULES): weights split over `tensor` only and replicated over `data`
  and `fsdp`, batch over data x fsdp. Decoding then never gathers a weight: under the train
  layout XLA all-gathers every matrix once per decode call, and each device ends up holding a
  full replica anyway, without the layout saying so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes it is split over (in order). A mesh axis of size 1 is a no-op.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # Parameters: FSDP over the model dimension, tensor parallel over heads / MLP / vocab.
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "norm": (),
    # The leading dimension of scanned (stacked) layer parameters: never split, each device
    # holds every layer's shard of the other dimensions.
    "layers": (),
    # Activations.
    "batch": ("data", "fsdp"),
    "length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "cache_length": (),
}

# Inference: no weight dimension over fsdp (each device keeps params / tensor).
INFERENCE_RULES: dict[str, tuple[str, ...]] = {**LOGICAL_RULES, "embed": ()}
LAYOUTS = {"train": LOGICAL_RULES, "inference": INFERENCE_RULES}

_warned: set = set()


class ShardingError(ValueError):
  """A mesh or logical axis that cannot be resolved."""


def mesh_sizes(shape: Mapping[str, int] | Sequence[int] | None,
               num_devices: int) -> dict[str, int]:
  """{axis: size} for every mesh axis, the one -1 axis (if any) resolved to the remaining
  devices; raises ShardingError unless the sizes multiply to exactly `num_devices`.

  The one divisibility rule for `make_mesh` and the config check (preflight.check_mesh), so
  a config that passes preflight builds its mesh. `shape=None` puts every device on `fsdp`;
  a sequence lists sizes in MESH_AXES order; missing axes are 1. Messages name the problem
  and the fix but not the shape (callers prefix their own spelling of it).
  """
  if shape is None:
    shape = {"fsdp": -1}
  if not isinstance(shape, Mapping):
    shape = dict(zip(MESH_AXES, shape))
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ShardingError(f"unknown axis {sorted(unknown)[0]!r}; axes are {MESH_AXES}")
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  free = [a for a, s in sizes.items() if s == -1]
  if bad or len(free) > 1:
    raise ShardingError("each axis must be a positive size, at most one may be -1 (all "
                        "remaining devices)")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  fits = num_devices % fixed == 0 if free else fixed == num_devices
  if not fits:
    need, detail = (("divide", f"{num_devices} devices are not divisible by {fixed}") if free
                    else ("equal", f"the mesh needs {fixed} devices but {num_devices} are "
                          "available"))
    raise ShardingError(
        f"the product of the fixed axes ({fixed}) must {need} the {num_devices} devices; set "
        f"one axis to -1 (e.g. fsdp=-1) or sizes whose product is {num_devices} ({detail})")
  if free:
    sizes[free[0]] = num_devices // fixed
  return sizes


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a ('data', 'fsdp', 'tensor') mesh; one axis may be -1 (= the remaining devices).

  `shape=None` puts every device on `fsdp` (sizes: `mesh_sizes`). Axis types are Auto so that
  jit and sharding constraints propagate shardings (jax 0.10 defaults `make_mesh` to Explicit).
  """
  devices = list(devices if devices is not None else jax.devices())
  try:
    sizes = mesh_sizes(shape, len(devices))
  except ShardingError as e:
    raise ShardingError(f"mesh {dict(shape) if isinstance(shape, Mapping) else shape}: {e}"
                        ) from None
  grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Mapping = LOGICAL_RULES) -> P:
  """Resolves logical axis names to a PartitionSpec.

  A mesh axis is used once per array (first logical axis wins). With `shape` and `mesh`, mesh
  axes that do not divide a dimension are dropped for it (e.g. 2 KV heads on tensor=4), which
  keeps every placement valid; each such fallback is logged once.
  """
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ShardingError(f"unknown logical axis {name!r}; known: {', '.join(sorted(rules))}")
    axes = []
    for axis in rules[name]:
      if axis in used:
        continue
      if mesh is not None:
        size = mesh.shape.get(axis, 1)
        if size == 1:
          continue
        if shape is not None and shape[i] % (math.prod(mesh.shape[a] for a in axes) * size):
          key = (name, shape[i], axis)
          if key not in _warned:
            _warned.add(key)
            logging.info("sharding: %s dim %d not divisible by mesh axis %s=%d; replicated",
                         name, shape[i], axis, size)
          continue
      axes.append(axis)
      used.add(axis)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*spec)


def rules(layout: str) -> Mapping[str, tuple[str, ...]]:
  """The rules table of a layout ('train' or 'inference')."""
  if layout not in LAYOUTS:
    raise ShardingError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
  return LAYOUTS[layout]


def named_sharding(mesh: Mesh, logical: Sequence[str | None],
                   shape: Sequence[int] | None = None, layout: str = "train") -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules(layout)))


def constrain(x: jax.Array, mesh: Mesh | None, logical: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation; applied on every backend (CPU included) when a
  mesh is given, so the emulated 8-device tests exercise the same partitioning as a TPU."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical, x.shape))


def config_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
  """The mesh a run config's `mesh` section asks for (data, fsdp, tensor; one may be -1)."""
  return make_mesh({"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor},
                   devices)


def local_mesh(mesh_cfg) -> Mesh:
  """This host's devices only, for inference (decode, scoring), which runs data parallel
  across hosts: the configured axes when they fit this host, else fsdp over all of them."""
  devices = jax.local_devices()
  try:
    return config_mesh(mesh_cfg, devices)
  except ShardingError:
    return make_mesh({"fsdp": -1}, devices)
