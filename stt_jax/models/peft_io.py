"""Our LoRA adapters <-> a PEFT adapter folder, so a run's adapter loads in HF PEFT and a PEFT
adapter can start a run.

The folder is what `PeftModel.save_pretrained` writes: `adapter_config.json` and
`adapter_model.safetensors` with `base_model.model.<HF module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r] per adapted projection. Those are our lora_a [in, r] and
lora_b [r, out] transposed, as HF Linear weights are (hf_io.NAME_TABLE); a stacked adapter
([layers, ...], scanned models) is one pair per layer, named like its layer's weights. The
update scale is the same on both sides: lora_alpha / r (PEFT without `use_rslora`).

PEFT loads keys that lack the `base_model.model.` prefix with a warning only, and the adapter
then does nothing; so `save_peft` always writes it, and `load_peft` is strict the other way:
any key, shape or option it cannot map exactly onto this model is a one-line AdapterError.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re

import jax
import numpy as np
from flax import nnx

from stt_jax import appendlog
from stt_jax.models import hf_io, lora, safetensors_io
from stt_jax.models.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")

# adapter_config.json keys that do not change what the saved weights compute: metadata, and
# options of initialisation, training or PEFT's runtime. r, lora_alpha, lora_dropout and
# target_modules are read; every other key must hold its plain-LoRA value (see _check_option).
_NEUTRAL = frozenset((
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
    "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "auto_mapping", "layers_pattern", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "runtime_config",
    "ensure_weight_tying"))
# Initialisations after which the weights are plain LoRA on the unchanged base model (PiSSA,
# OLoRA, CorDA and LoftQ change the base weights unless PEFT converted the adapter on save).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_MERGE_HINT = ("merge it into its base model with PEFT (merge_and_unload().save_pretrained(dir)) "
               "and use that folder as model.path")
_HINTS = {
    "use_rslora": "rsLoRA scales by lora_alpha / sqrt(r): set use_rslora false and multiply "
                  "lora_alpha by sqrt(r) for the same adapter",
    "init_lora_weights": "this initialisation changes the base weights; re-save the adapter "
                         "with save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                         "to get plain LoRA, or " + _MERGE_HINT,
}


class AdapterError(ValueError):
  """A PEFT adapter folder that does not map exactly onto the model."""


# ------------------------------------------------------------------------------ save


def _adapted(model: nnx.Module):
  """(LoRALinear, [HF module per row], stacked?) of every adapter, in model order."""
  layers = model.config.num_hidden_layers
  for path, layer in lora.adapters(model):
    keys = (*path, "kernel")
    names = [n.removesuffix(".weight") for n in hf_io.hf_names(keys, layers)[0]]
    yield layer, names, hf_io.is_stacked(keys)


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def adapter_config(model: nnx.Module, base_model_name_or_path: str | None) -> dict:
  """The adapter_config.json of `model`'s adapters (one rank, alpha and dropout for all, as
  apply_lora makes them)."""
  adapters = list(_adapted(model))
  if not adapters:
    raise ValueError("save_peft: the model has no LoRA adapters (train.method='lora' makes "
                     "them); export a fully trained model with save_hf")
  settings = {(int(m.lora_a.get_value().shape[-1]), m.scale, m.dropout.rate)
              for m, _, _ in adapters}
  if len(settings) != 1:
    raise ValueError(f"save_peft: adapters differ in (rank, scale, dropout): {sorted(settings)}; "
                     "PEFT's rank_pattern/alpha_pattern are not written")
  (rank, scale, dropout), = settings
  targets = [t for t in lora.TARGETS
             if any(modules[0].endswith("." + t) for _, modules, _ in adapters)]
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path, "revision": None,
      "r": rank, "lora_alpha": _number(round(scale * rank, 6)), "lora_dropout": float(dropout),
      "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "modules_to_save": None,
      "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
      "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
  }


def adapter_tensors(model: nnx.Module):
  """(PEFT key, lazy tensor) of every adapter matrix, transposed to PEFT's [r, in] / [out, r]."""
  for layer, modules, stacked in _adapted(model):
    for var, ab in ((layer.lora_a, "A"), (layer.lora_b, "B")):
      keys = [f"{PREFIX}{m}.lora_{ab}.weight" for m in modules]
      yield from hf_io.lazy_rows(var.get_value(), keys, stacked, transpose=True)


def save_peft(model: nnx.Module, config: ModelConfig, out_dir: str | os.PathLike,
              base_model_name_or_path: str | None = None) -> str:
  """Writes `model`'s adapters as a PEFT LoRA folder that `PeftModel.from_pretrained(base,
  out_dir)` loads onto the HF base model.

  base_model_name_or_path: recorded in the config (default: the folder the model was loaded
  from). In multi-host runs every process must call this; only process 0 writes.
  """
  out_dir = os.fspath(out_dir)
  settings = adapter_config(model, base_model_name_or_path or config.source_dir)
  tensors = sorted(adapter_tensors(model), key=lambda kv: kv[0])  # The same file in any layout.
  if jax.process_index() != 0:
    for _, t in tensors:  # Take part in the gathers of non-addressable arrays.
      t.fetch()
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  safetensors_io.write(os.path.join(out_dir, WEIGHTS_FILE), tensors)
  appendlog.write_json(os.path.join(out_dir, CONFIG_FILE), settings)
  logging.info("save_peft: wrote %d adapter tensors (r=%d) to %s", len(tensors), settings["r"],
               out_dir)
  return out_dir


# ------------------------------------------------------------------------------ load


def _read_settings(path: str) -> dict:
  """adapter_config.json, checked to describe plain LoRA (raises AdapterError otherwise)."""
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise AdapterError(f"{path}: not found; a PEFT adapter folder holds {CONFIG_FILE} and "
                       f"{WEIGHTS_FILE} (PeftModel.save_pretrained)") from None
  except json.JSONDecodeError as e:
    raise AdapterError(f"{path}: not valid JSON ({e}); re-save the adapter") from None
  if raw.get("peft_type") != "LORA":
    raise AdapterError(f"{path}: peft_type={raw.get('peft_type')!r}; only LoRA adapters "
                       "('LORA') map onto stt_jax LoRA")
  for key, value in sorted(raw.items()):
    _check_option(path, key, value)
  for key in ("r", "lora_alpha", "target_modules"):
    if raw.get(key) in (None, "", []):
      raise AdapterError(f"{path}: '{key}' is missing; re-save the adapter with "
                         "PeftModel.save_pretrained")
  return raw


def _check_option(path: str, key: str, value) -> None:
  """Refuses an option whose value is not plain LoRA (DoRA, rsLoRA, biases, per-module ranks,
  extra trained modules, options of newer PEFT versions...)."""
  if key in _NEUTRAL:
    return
  if key == "init_lora_weights":
    plain = value in _PLAIN_INITS
  elif key == "bias":
    plain = value == "none"
  else:
    plain = value in (None, False, "", [], {})
  if not plain:
    raise AdapterError(f"{path}: {key}={json.dumps(value)} is not plain LoRA, the only kind "
                       f"stt_jax implements; {_HINTS.get(key, _MERGE_HINT)}")


def _modules(model: nnx.Module) -> dict[str, tuple[str | None, tuple[int, int]]]:
  """HF module name -> (projection name, or None for other modules; (in, out) of its kernel)
  for every module with weights."""
  layers = model.config.num_hidden_layers
  out = {}
  for keys, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if isinstance(var, nnx.LoRAParam):
      continue
    keys = tuple(k for k in keys if k != "base_module")
    shape = tuple(var.get_value().shape[1:] if hf_io.is_stacked(keys) else var.get_value().shape)
    for name in hf_io.hf_names(keys, layers)[0]:
      module, leaf = name.rsplit(".", 1)
      if leaf == "weight":
        proj = module.rsplit(".", 1)[-1]
        out[module] = (proj if proj in lora.TARGETS else None, shape[-2:])
  return out


def _targeted(path: str, target_modules, modules) -> set[str]:
  """The HF modules PEFT's `target_modules` selects, matched as PEFT does: a string is a
  regex over the full name ('all-linear': every projection), a list names module suffixes."""
  if target_modules == "all-linear":
    return {m for m, (proj, _) in modules.items() if proj}
  if isinstance(target_modules, str):
    return {m for m in modules if re.fullmatch(target_modules, m)}
  names = list(target_modules)
  unknown = [n for n in names if not any(m == n or m.endswith("." + n) for m in modules)]
  if unknown:
    raise AdapterError(f"{path}: target_modules names {unknown[0]!r}, which this model does not "
                       "have; the adapter was made for another architecture")
  return {m for m in modules if any(m == n or m.endswith("." + n) for n in names)}


def _expected_keys(cfg_path: str, settings: dict, modules
                   ) -> tuple[dict[str, tuple[int, int]], set[str]]:
  """(PEFT key -> shape for every adapter matrix the config implies on this model, the
  projections it adapts)."""
  targeted = _targeted(cfg_path, settings["target_modules"], modules)
  other = sorted(m for m in targeted if modules[m][0] is None)
  if other:
    raise AdapterError(f"{cfg_path}: target_modules adapts {other[0]!r}; stt_jax LoRA adapts "
                       f"only the projections {', '.join(lora.TARGETS)}; {_MERGE_HINT}")
  if not targeted:
    raise AdapterError(f"{cfg_path}: target_modules={settings['target_modules']!r} selects no "
                       "module of this model")
  projections = {modules[m][0] for m in targeted}
  partial = sorted(m for m, (proj, _) in modules.items()
                   if proj in projections and m not in targeted)
  if partial:
    raise AdapterError(f"{cfg_path}: the adapter leaves {partial[0]!r} out (exclude_modules?); "
                       f"stt_jax adapts a projection in every layer; {_MERGE_HINT}")
  r = int(settings["r"])
  out = {}
  for m in targeted:
    fan_in, fan_out = modules[m][1]
    out[f"{PREFIX}{m}.lora_A.weight"] = (r, fan_in)
    out[f"{PREFIX}{m}.lora_B.weight"] = (fan_out, r)
  return out, projections


def _check_weights(f: safetensors_io.SafetensorsFile, expected: dict) -> None:
  """Every key of the file is an expected adapter matrix of the expected shape, and none is
  missing."""
  for key in sorted(f.keys()):
    if key not in expected:
      if not key.startswith(PREFIX) and f"{PREFIX}{key}" in expected:
        why = (f"lacks the '{PREFIX}' prefix (PEFT would ignore it with a warning); rename the "
               f"keys to '{PREFIX}<module>.lora_A.weight'")
      elif _KEY.fullmatch(key):
        why = "is for a module adapter_config.json does not target; re-save the adapter"
      else:
        why = ("is not a lora_A/lora_B weight of a targeted projection (DoRA magnitudes, biases "
               f"and extra modules are not implemented); {_MERGE_HINT}")
      raise AdapterError(f"{f.path}: key {key!r} {why}")
    if f.shape(key) != expected[key]:
      raise AdapterError(f"{f.path}: key {key!r} has shape {list(f.shape(key))}, this model "
                         f"needs {list(expected[key])} (r and the layer's sizes); the adapter "
                         "was made for another model or rank")
    if not np.issubdtype(f.dtype(key), np.floating) and f.dtype(key).name != "bfloat16":
      raise AdapterError(f"{f.path}: key {key!r} has non-float dtype {f.dtype(key)}")
  missing = sorted(set(expected) - set(f.keys()))
  if missing:
    raise AdapterError(f"{f.path}: key {missing[0]!r} is missing ({len(missing)} of "
                       f"{len(expected)} expected); the adapter was made for another model "
                       "(fewer layers?) or is incomplete")


def _match_existing(path: str, model: nnx.Module, settings: dict, projections: set[str]) -> None:
  """A model that already has adapters must have these: same projections, rank and scale."""
  adapters = list(_adapted(model))
  have = {m.rsplit(".", 1)[-1] for _, modules, _ in adapters for m in modules}
  r, alpha = int(settings["r"]), float(settings["lora_alpha"])
  for layer, modules, _ in adapters:
    rank = int(layer.lora_a.get_value().shape[-1])
    if have != projections or rank != r or not np.isclose(layer.scale, alpha / r):
      raise AdapterError(
          f"{path}: the model's adapters ({', '.join(sorted(have))}, r={rank}, alpha="
          f"{layer.scale * rank:g}) differ from the adapter's ({', '.join(sorted(projections))}, "
          f"r={r}, alpha={alpha:g}); set train.lora.rank/alpha/targets to match it")


def _fill(var: nnx.Variable, f: safetensors_io.SafetensorsFile, keys: list[str],
          stacked: bool) -> None:
  """Sets `var` (placed as it is) from PEFT tensors `keys`, transposed, one per row if stacked."""
  value = var.get_value()
  views = [f.tensor(k).T for k in keys]
  if stacked:
    read = functools.partial(hf_io.read_rows, views, value.shape, value.dtype)
  else:
    read = lambda idx: np.array(views[0][idx], dtype=value.dtype)
  var.set_value(jax.make_array_from_callback(value.shape, value.sharding, read))


def load_peft(model: nnx.Module, adapter_dir: str | os.PathLike, *, seed: int = 0
              ) -> nnx.Module:
  """Puts a PEFT LoRA adapter onto `model` in place (and returns it), e.g. to train on from it.

  A model without adapters gets them first (apply_lora with the adapter's r, lora_alpha,
  lora_dropout and projections; `seed` only seeds their dropout keys); one that has them
  must match. Every key, shape and option is checked before anything changes: a mismatch is
  an AdapterError naming the file and the key.
  """
  adapter_dir = os.fspath(adapter_dir)
  cfg_path = os.path.join(adapter_dir, CONFIG_FILE)
  weights = os.path.join(adapter_dir, WEIGHTS_FILE)
  settings = _read_settings(cfg_path)
  if not os.path.isfile(weights):
    pickle = os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin"))
    raise AdapterError(f"{weights}: not found{' (pickles are never unpickled here)' * pickle}; "
                       "re-save the adapter with PeftModel.save_pretrained(dir, "
                       "safe_serialization=True)")
  modules = _modules(model)
  expected, projections = _expected_keys(cfg_path, settings, modules)
  with safetensors_io.SafetensorsFile(weights) as f:
    _check_weights(f, expected)
    if lora.has_lora(model):
      _match_existing(cfg_path, model, settings, projections)
    else:
      lora.apply_lora(model, rank=int(settings["r"]), alpha=float(settings["lora_alpha"]),
                      dropout=float(settings.get("lora_dropout") or 0.0),
                      targets=[t for t in lora.TARGETS if t in projections], seed=seed)
    for layer, names, stacked in _adapted(model):
      for var, ab in ((layer.lora_a, "A"), (layer.lora_b, "B")):
        _fill(var, f, [f"{PREFIX}{m}.lora_{ab}.weight" for m in names], stacked)
  logging.info("load_peft: %d adapter tensors (r=%s, alpha=%s) from %s", len(expected),
               settings["r"], settings["lora_alpha"], adapter_dir)
  return model
