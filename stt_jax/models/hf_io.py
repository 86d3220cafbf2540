"""Hugging Face folder <-> sharded NNX model.

One strict name table (`NAME_TABLE`) drives both directions: each row pairs an HF tensor name
template with ours and says whether the 2-D weight is transposed (HF Linear stores [out, in],
nnx.Linear [in, out]). Loading is abstract-first and streamed: the model is built with
`nnx.eval_shape`, each parameter's NamedSharding comes from its logical axes, and every device
shard is read straight from the memory-mapped safetensors file, so the host never holds more
than one tensor plus the shards it owns.

A scanned model (`scan_layers=True`, the default) holds each layer parameter stacked
(`model.layers.self_attn.q_proj.kernel`: [layers, in, out]); the HF names stay per layer.
Loading reads row i of a device shard from `model.layers.{i}.*` (a shard's slice along the
layer dimension selects which HF tensors it reads); saving writes each row back under its
`model.layers.{i}.*` name. The name table itself is the same for both layouts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from stt_jax import appendlog, sharding
from stt_jax.models import lora, safetensors_io
from stt_jax.models.config import ConfigError, ModelConfig
from stt_jax.models.decoder import CausalLM

# (HF template, our template, transpose). `{i}` is a layer index, `{proj}` a module name.
NAME_TABLE = (
    ("model.embed_tokens.weight", "model.embed_tokens.embedding", False),
    ("model.layers.{i}.self_attn.{proj}.weight", "model.layers.{i}.self_attn.{proj}.kernel", True),
    ("model.layers.{i}.self_attn.{proj}.bias", "model.layers.{i}.self_attn.{proj}.bias", False),
    ("model.layers.{i}.self_attn.{qk}_norm.weight", "model.layers.{i}.self_attn.{qk}_norm.weight",
     False),
    ("model.layers.{i}.mlp.{proj}.weight", "model.layers.{i}.mlp.{proj}.kernel", True),
    ("model.layers.{i}.mlp.{proj}.bias", "model.layers.{i}.mlp.{proj}.bias", False),
    ("model.layers.{i}.{norm}.weight", "model.layers.{i}.{norm}.weight", False),
    ("model.norm.weight", "model.norm.weight", False),
    ("lm_head.weight", "lm_head.kernel", True),
)
# HF tensors that carry no parameters of ours (recomputed buffers).
IGNORED = (re.compile(r".*\.rotary_emb\.inv_freq$"),)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
_PLACEHOLDER = {"i": r"\d+", "proj": r"[a-z_]+_proj", "norm": r"[a-z_]+layernorm", "qk": "[qk]"}


class LoadError(ValueError):
  """A model folder whose weights do not match its config."""


def _compile(template: str) -> re.Pattern:
  parts = re.split(r"\{(\w+)\}", template)
  regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_PLACEHOLDER[p]})"
                  for k, p in enumerate(parts))
  return re.compile(regex + "$")


_HF_TO_OURS = [(_compile(hf), ours, t) for hf, ours, t in NAME_TABLE]
_OURS_TO_HF = [(_compile(ours), hf, t) for hf, ours, t in NAME_TABLE]


def our_to_hf_name(name: str) -> tuple[str, bool]:
  """Our parameter path -> (HF tensor name, transposed?)."""
  for regex, template, transpose in _OURS_TO_HF:
    m = regex.match(name)
    if m:
      return template.format(**m.groupdict()), transpose
  raise LoadError(f"parameter {name!r} has no entry in hf_io.NAME_TABLE")


def is_stacked(keys) -> bool:
  """A stacked layer parameter's path: model.layers.<not an index>...."""
  keys = tuple(keys)
  return len(keys) > 2 and keys[:2] == ("model", "layers") and not isinstance(keys[2], int)


def hf_names(keys, layers: int) -> tuple[list[str], bool]:
  """Our parameter path -> ([HF name per row], transposed?): one name, or one per layer for
  a stacked parameter (row i = `model.layers.{i}.*`)."""
  stacked = is_stacked(keys)
  keys = tuple(str(k) for k in keys)
  if not stacked:
    hf, transpose = our_to_hf_name(".".join(keys))
    return [hf], transpose
  rest = ".".join(keys[2:])
  rows = [our_to_hf_name(f"model.layers.{i}.{rest}") for i in range(layers)]
  return [hf for hf, _ in rows], rows[0][1]


def hf_to_our_name(name: str) -> str | None:
  for regex, template, _ in _HF_TO_OURS:
    m = regex.match(name)
    if m:
      return template.format(**m.groupdict())
  return None


# ------------------------------------------------------------------------------ load


class _WeightFiles:
  """The safetensors files of a folder (single or sharded), opened lazily, closed together."""

  def __init__(self, folder: str):
    self.folder = folder
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        try:
          self.weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise LoadError(f"{index}: not a valid safetensors index ({e}); re-download it") from e
    elif os.path.isfile(single):
      self.weight_map = None
    else:
      pickles = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
      if pickles:
        raise LoadError(
            f"{folder}: only pickle weights ({pickles[0]}) found; they are never unpickled here. "
            "Convert once with transformers: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(out_dir, safe_serialization=True)")
      raise LoadError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    self._open: dict[str, safetensors_io.SafetensorsFile] = {}
    if self.weight_map is None:
      self._names = {n: "model.safetensors" for n in self._file("model.safetensors").keys()}
    else:
      self._names = dict(self.weight_map)

  def _file(self, fname: str) -> safetensors_io.SafetensorsFile:
    if fname not in self._open:
      path = os.path.join(self.folder, fname)
      if not os.path.isfile(path):
        raise LoadError(f"{path}: listed in model.safetensors.index.json but missing; "
                        "re-download the checkpoint")
      self._open[fname] = safetensors_io.SafetensorsFile(path)
    return self._open[fname]

  def names(self) -> list[str]:
    return list(self._names)

  def get(self, name: str) -> tuple[safetensors_io.SafetensorsFile, np.ndarray]:
    f = self._file(self._names[name])
    if name not in f.keys():
      raise LoadError(f"{f.path}: tensor {name!r} is listed in the index but absent from the file")
    return f, f.tensor(name)

  def release(self, name: str) -> None:
    self._file(self._names[name]).release(name)

  def close(self):
    for f in self._open.values():
      f.close()


def _view(files: _WeightFiles, name: str, shape: tuple[int, ...], transpose: bool
          ) -> tuple[safetensors_io.SafetensorsFile, np.ndarray]:
  """(file, memory-mapped tensor `name` in our orientation), checked against `shape`."""
  f, src = files.get(name)
  expected = shape[::-1] if transpose else shape
  if tuple(src.shape) != expected:
    raise LoadError(f"{f.path}: tensor {name!r} has shape {tuple(src.shape)}, config "
                    f"implies {expected}")
  if not np.issubdtype(src.dtype, np.floating) and src.dtype != np.dtype(jnp.bfloat16):
    raise LoadError(f"{f.path}: tensor {name!r} has non-float dtype {src.dtype}")
  return f, (src.T if transpose else src)


def read_rows(views: list[np.ndarray], shape: tuple[int, ...], target, idx) -> np.ndarray:
  """One device shard of a stacked parameter: rows `idx[0]` (one HF tensor each), each cut
  to `idx[1:]`."""
  rows = range(shape[0])[idx[0]]
  out = np.empty((len(rows),) + tuple(len(range(d)[s]) for d, s in zip(shape[1:], idx[1:])),
                 target)
  for k, i in enumerate(rows):
    out[k] = views[i][idx[1:]]
  return out


def check_weights(path: str | os.PathLike) -> None:
  """Reads every weight file's header (not its data): a corrupt, truncated or pickle-only
  folder fails in milliseconds, before a run compiles anything."""
  files = _WeightFiles(os.fspath(path))
  try:
    for fname in sorted(set((files.weight_map or {}).values())):
      files._file(fname)  # pylint: disable=protected-access
  finally:
    files.close()


def abstract_model(config: ModelConfig, dtype="float32", param_dtype=None,
                   mesh: Mesh | None = None, scan_layers: bool = True,
                   attention: str = "auto") -> CausalLM:
  """The model with ShapeDtypeStruct leaves: no memory allocated."""
  dtype = jnp.dtype(dtype)
  param_dtype = jnp.dtype(param_dtype or dtype)
  return nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, param_dtype=param_dtype,
                                         mesh=mesh, rngs=nnx.Rngs(0), scan_layers=scan_layers,
                                         attention=attention))


def param_sharding(variable, shape, mesh: Mesh | None, layout: str = "train"):
  """NamedSharding from a parameter's `logical_axes` metadata under `layout` (sharding.LAYOUTS;
  single device without mesh)."""
  if mesh is None:
    return SingleDeviceSharding(jax.local_devices()[0])  # This host's, in multi-host runs too.
  axes = variable.get_metadata().get("logical_axes")
  if axes is None or len(axes) != len(shape):
    raise LoadError(f"parameter with shape {shape} lacks logical_axes metadata")
  return sharding.named_sharding(mesh, axes, shape, layout)


def load_hf(path: str | os.PathLike, mesh: Mesh | None = None, dtype="float32",
            param_dtype=None, layout: str = "train", scan_layers: bool = True,
            attention: str = "auto") -> tuple[CausalLM, ModelConfig]:
  """Loads a local HF folder into a (sharded) CausalLM.

  dtype: compute dtype; param_dtype: storage dtype (default: dtype). Weights of any float dtype
  in the file are cast to param_dtype per shard, while reading. layout: 'train' (weights over
  fsdp + tensor) or 'inference' (over tensor only, for decoding and scoring; sharding.LAYOUTS).
  scan_layers: stacked layers under lax.scan (default) or unrolled (decoder.CausalLM).
  attention: the full-sequence attention kernel (model.attention; models/attention.py).
  """
  sharding.rules(layout)  # An unknown layout fails before any file is read.
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise LoadError(f"{path}: model folder not found; pass a local Hugging Face folder "
                    "(run `python -m stt_jax.models.fetch_demo` for the demo model)")
  config = ModelConfig.from_hf(path)
  config = dataclasses.replace(config, source_dir=os.path.abspath(path))
  model = abstract_model(config, dtype, param_dtype, mesh, scan_layers, attention)
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  files = _WeightFiles(path)
  try:
    available = set(files.names())
    wanted = {}
    params = []  # (var, [HF name per row], stacked?, transpose)
    for keys, var in flat:
      names, transpose = hf_names(keys, config.num_hidden_layers)
      params.append((var, names, is_stacked(keys), transpose))
      wanted.update({n: transpose for n in names})
    missing = sorted(set(wanted) - available)
    if missing:
      raise LoadError(f"{path}: missing {len(missing)} tensor(s) for {config.architecture}: "
                      f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(n for n in available - set(wanted)
                        if not any(r.match(n) for r in IGNORED)
                        and not (n == "lm_head.weight" and config.tie_word_embeddings))
    if unexpected:
      raise LoadError(f"{path}: unexpected tensor(s) {', '.join(unexpected[:5])}"
                      f"{' ...' if len(unexpected) > 5 else ''}; the config.json does not "
                      "describe these weights")
    for var, names, stacked, transpose in params:
      shape = tuple(var.get_value().shape)
      target = var.get_value().dtype
      if not stacked:
        f, view = _view(files, names[0], shape, transpose)
        read = lambda idx, view=view, target=target: np.array(view[idx], dtype=target)
      else:  # Stacked: a shard's slice of the layer dim says which HF tensors it reads.
        views = [_view(files, n, shape[1:], transpose)[1] for n in names]
        read = functools.partial(read_rows, views, shape, target)
      var.set_value(jax.make_array_from_callback(
          shape, param_sharding(var, shape, mesh, layout), read))
      for n in names:
        files.release(n)
  finally:
    files.close()
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  return model, config


# ------------------------------------------------------------------------------ save


def hf_tensors(model: CausalLM, dtype=None) -> Iterator[tuple[str, safetensors_io.LazyTensor]]:
  """(HF name, lazily fetched numpy tensor) for every parameter, in model order; a stacked
  layer parameter gives one tensor per layer (`model.layers.{i}.*`, row i)."""
  state = nnx.state(model, nnx.Param)
  for keys, var in nnx.to_flat_state(state):
    value = var.get_value()
    stacked = is_stacked(keys)
    names, transpose = hf_names(keys, value.shape[0] if stacked else 0)
    yield from lazy_rows(value, names, stacked, transpose, dtype)


def lazy_rows(value: jax.Array, names: list[str], stacked: bool, transpose: bool, dtype=None
              ) -> Iterator[tuple[str, safetensors_io.LazyTensor]]:
  """(name, lazy tensor) per name: `value` itself, or row i of a stacked `value`; transposed
  to HF's [out, in] when `transpose`. Shared by save_hf and peft_io.save_peft."""
  out_dtype = np.dtype(dtype or value.dtype)
  row_shape = tuple(value.shape[1:] if stacked else value.shape)
  shape = row_shape[::-1] if transpose else row_shape
  for i, name in enumerate(names):

    def fetch(i=i if stacked else None):
      host = _to_host(value if i is None else value[i])
      return np.ascontiguousarray((host.T if transpose else host).astype(out_dtype))

    yield name, safetensors_io.LazyTensor(shape, out_dtype, fetch)


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_hf(model: CausalLM, config: ModelConfig, out_dir: str | os.PathLike,
            tokenizer_dir: str | os.PathLike | None = None, dtype=None,
            max_shard_bytes: int = 2 * 1024**3) -> str:
  """Writes an HF folder (config.json, safetensors shards + index, tokenizer files) that
  `transformers.AutoModelForCausalLM.from_pretrained` loads.

  dtype: saved dtype (default: the parameters' dtype). tokenizer_dir: where tokenizer files are
  copied from (default: the folder the model was loaded from, if known). A LoRA model is merged
  first (see stt_jax.models.lora). In multi-host runs every process must call this; only
  process 0 writes.
  """
  out_dir = os.fspath(out_dir)
  model = lora.merged_for_export(model)  # Adapters folded into a plain copy; else as is.
  tensors = list(hf_tensors(model, dtype))
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  shards: list[list[tuple[str, safetensors_io.LazyTensor]]] = [[]]
  size = 0
  for name, t in tensors:
    nbytes = int(np.prod(t.shape)) * t.dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, t))
    size += nbytes
  n = len(shards)
  weight_map = {}
  for k, shard in enumerate(shards):
    fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    if writer:
      safetensors_io.write(os.path.join(out_dir, fname), shard)
    else:
      for _, t in shard:  # Take part in the gathers of non-addressable arrays.
        t.fetch()
    weight_map.update({name: fname for name, _ in shard})
  if not writer:
    return out_dir
  if n > 1:
    total = sum(int(np.prod(t.shape)) * t.dtype.itemsize for _, t in tensors)
    appendlog.write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                         {"metadata": {"total_size": total}, "weight_map": weight_map})
  saved = np.dtype(dtype or tensors[0][1].dtype)
  hf_dict = config.to_hf_dict(dtype=_dtype_name(saved))
  appendlog.write_json(os.path.join(out_dir, "config.json"), hf_dict)
  tokenizer_dir = os.fspath(tokenizer_dir) if tokenizer_dir else config.source_dir
  if tokenizer_dir and os.path.abspath(tokenizer_dir) != os.path.abspath(out_dir):
    for fname in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, fname)
      if os.path.isfile(src):
        shutil.copyfile(src, os.path.join(out_dir, fname))
  logging.info("save_hf: wrote %d tensors in %d file(s) to %s", len(tensors), n, out_dir)
  return out_dir


def _dtype_name(dtype: np.dtype) -> str:
  return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
      np.dtype(dtype).name, np.dtype(dtype).name)


__all__ = ["load_hf", "save_hf", "abstract_model", "LoadError", "ConfigError", "NAME_TABLE"]
