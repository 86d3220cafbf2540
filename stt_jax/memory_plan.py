"""Per-device memory plan of a run on a TPU slice: training (full or LoRA) and decoding
(translate, eval), from the run config and the model's shape, before any machine is rented.
Pipeline side, like preflight and budgets: it reads a run config.

    python -m stt_jax.memory_plan --config=configs/mgsm_th.py --chip=v5e-8
    python -m stt_jax.memory_plan --config=configs/mgsm_th.py --chip=v4-8 \
        --config.train.method=full
    python -m stt_jax.memory_plan --config=configs/mgsm_th.py --all_chips  # full + LoRA

Exact where the arrays are known: parameters, gradients and AdamW moments are the bytes of
the model's own variables (the abstract model, LoRA adapters applied as training applies
them) placed by the sharding rules of their layout (`sharding.LAYOUTS`); the KV cache is
`engine.kv_bytes` of the engine's slots at the model's full context, split as the cache is
(batch over data x fsdp, KV heads over tensor). Activations are an estimate (see
`activation_bytes`), and XLA adds temporaries and fragmentation on top: plan for ~10-15%
headroom. Nothing here needs an accelerator, a model folder or weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from stt_jax import engine, loss, sharding
from stt_jax.models import attention, hf_io, lora
from stt_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU slice as JAX sees it: `devices` (jax.device_count() on one host) of `hbm` bytes."""

  name: str
  devices: int
  hbm: int
  note: str


GIB = 2**30
# v4 and v5p chips have two TensorCores run as one device (megacore): a v4-8 / v5p-8 is 4
# chips, 8 cores, 4 JAX devices. v5e and v6e chips have one TensorCore: 8 chips, 8 devices.
CHIPS = {
    "v4-8": Chip("v4-8", 4, 32 * GIB, "4 chips x 2 TensorCores (megacore), 32 GiB HBM2 each"),
    "v5e-8": Chip("v5e-8", 8, 16 * GIB, "8 chips x 1 TensorCore, 16 GiB HBM2e each"),
    "v5p-8": Chip("v5p-8", 4, 95 * GIB, "4 chips x 2 TensorCores (megacore), 95 GiB HBM2e each"),
    "v6e-8": Chip("v6e-8", 8, 32 * GIB, "8 chips x 1 TensorCore, 32 GiB HBM each"),
}

# meta-llama/Llama-2-7b-hf config.json (the paper's model), for plans without the folder.
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}


def model_config(cfg) -> tuple[ModelConfig, str]:
  """(the run's model shape, where it came from): model.path's config.json when the folder
  is here, else Llama-2-7B's (the paper configs' model)."""
  path = os.path.join(cfg.model.path, "config.json") if cfg.model.path else ""
  if path and os.path.isfile(path):
    return ModelConfig.from_hf(cfg.model.path), path
  return ModelConfig.from_hf_dict(LLAMA2_7B, "Llama-2-7B"), "Llama-2-7B shape (built in)"


def _abstract(config: ModelConfig, dtype, param_dtype, scan: bool, t=None) -> nnx.Module:
  """The model with ShapeDtypeStruct leaves; with `t` (a train section, method 'lora') the
  adapters `train` adds, in train.param_dtype."""
  if t is None or t.method != "lora":
    return hf_io.abstract_model(config, dtype, param_dtype, scan_layers=scan)

  def build():
    from stt_jax.models.decoder import CausalLM  # pylint: disable=g-import-not-at-top
    model = CausalLM(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                     rngs=nnx.Rngs(0), scan_layers=scan)
    return lora.apply_lora(model, rank=t.lora.rank, alpha=t.lora.alpha, targets=t.lora.targets,
                           param_dtype=jnp.dtype(t.param_dtype))
  return nnx.eval_shape(build)


def _shard_bytes(shape, dtype, logical, sizes: dict, layout: str) -> int:
  """Bytes of one device's shard of an array (the largest shard, if uneven)."""
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  spec = sharding.logical_to_spec(logical, shape, mesh, sharding.rules(layout))
  per = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    per.append(-(-dim // math.prod(sizes[a] for a in axes)))
  return math.prod(per) * jnp.dtype(dtype).itemsize


def param_bytes(model: nnx.Module, sizes: dict, layout: str, kind=nnx.Param) -> int:
  """Per-device bytes of the model's `kind` variables placed under `layout`."""
  total = 0
  for _, v in nnx.to_flat_state(nnx.state(model, kind)):
    value = v.get_value()
    axes = v.get_metadata().get("logical_axes") or (None,) * len(value.shape)
    total += _shard_bytes(value.shape, value.dtype, axes, sizes, layout)
  return total


# Fused kernels: no [heads, L, L] scores in memory (splash_interpret: splash as tests run it).
FUSED = ("splash", "splash_interpret", "cudnn")


def scores_bytes(config: ModelConfig, rows: int, seq: int, dtype, tensor: int,
                 implementation: str = "xla") -> int:
  """One layer's attention scores per device under `implementation` (resolved
  model.attention). The XLA and einsum attention materialise [heads, L, L] in float32, their
  float32 gradient and the probabilities in the compute dtype; a fused kernel (splash on TPU,
  cuDNN on GPU) keeps only its output and a float32 log-sum-exp per query and head."""
  heads = -(-config.num_attention_heads // tensor)
  if implementation in FUSED:
    return rows * heads * seq * 4
  return rows * heads * seq * seq * (4 + 4 + jnp.dtype(dtype).itemsize)


def train_attention(cfg, config: ModelConfig) -> str:
  """The attention implementation training runs on a TPU under cfg.model.attention ('auto'
  is splash); an impossible choice (cudnn on TPU) is the one-line AttentionError."""
  return attention.resolve(cfg.model.attention, cfg.train.dtype, config.head_dim,
                           platform="tpu", soft_cap=config.attn_logit_softcapping)


def activation_bytes(config: ModelConfig, rows: int, seq: int, dtype, tensor: int,
                     remat: bool, implementation: str = "xla") -> int:
  """Estimated per-device activation bytes of one micro-batch's forward + backward.

  rows: sequences per device. Per layer, in the compute dtype: the layer input, q/k/v/attn
  out (4 x [L, heads x head_dim]), the MLP's gate/up/product ([L, intermediate] x 3), the
  norms' outputs (2 x [L, hidden]), plus `scores_bytes`. With remat only the layer inputs
  are kept for every layer and one layer's set lives at a time (recomputed in the
  backward); without it every layer keeps its set. Heads and the MLP split over `tensor`.
  The loss projects the LM head in chunks of at most loss.LOSS_LOGITS_BYTES of float32
  logits (x3: logits, softmax, gradient).
  """
  item = jnp.dtype(dtype).itemsize
  h, i = config.hidden_size, config.intermediate_size
  q = config.num_attention_heads * config.head_dim
  per_token = (h + 4 * q // tensor + 3 * i // tensor + 2 * h) * item
  layer = rows * seq * per_token + scores_bytes(config, rows, seq, dtype, tensor,
                                                implementation)
  inputs = rows * seq * h * item
  kept = config.num_hidden_layers * inputs + layer if remat else (
      config.num_hidden_layers * layer)
  logits = min(loss.LOSS_LOGITS_BYTES, rows * seq * config.vocab_size * 4) * 3
  return int(kept + logits)


def train_plan(cfg, chip: Chip) -> dict:
  """Per-device bytes of training under cfg.train on `chip` (the train layout)."""
  t = cfg.train
  config, _ = model_config(cfg)
  sizes = sharding.mesh_sizes({a: cfg.mesh[a] for a in sharding.MESH_AXES}, chip.devices)
  base_dtype = t.dtype if t.method == "lora" else t.param_dtype
  model = _abstract(config, t.dtype, base_dtype, cfg.model.scan_layers, t)
  trainable = nnx.LoRAParam if t.method == "lora" else nnx.Param
  train_bytes = param_bytes(model, sizes, "train", trainable)
  all_bytes = param_bytes(model, sizes, "train", nnx.Param)
  frozen = all_bytes - train_bytes if t.method == "lora" else 0
  impl = train_attention(cfg, config)
  dp = sizes["data"] * sizes["fsdp"]
  micro = t.batch_size // t.grad_accum
  rows = -(-micro // dp)
  # One layer's weights gathered over fsdp in the compute dtype (FSDP), two in flight
  # (XLA prefetches the next layer's while one computes).
  layer = config.num_params() - 2 * config.vocab_size * config.hidden_size
  layer //= config.num_hidden_layers
  gathered = 2 * layer * jnp.dtype(t.dtype).itemsize // sizes["tensor"] if sizes["fsdp"] > 1 \
      else 0
  return {
      "params": train_bytes if t.method == "full" else 0,
      "frozen_base": frozen,
      "adapters": train_bytes if t.method == "lora" else 0,
      # AdamW: mu and nu, each like its parameter (train.param_dtype).
      "optimizer": 2 * train_bytes,
      # The step's gradient; with grad_accum > 1 also the running sum of micro-batches.
      "gradients": train_bytes * (2 if t.grad_accum > 1 else 1),
      "fsdp_gather": gathered,
      "activations": activation_bytes(config, rows, t.seq_len, t.dtype, sizes["tensor"],
                                       t.remat, impl),
      "scores": scores_bytes(config, rows, t.seq_len, t.dtype, sizes["tensor"], impl),
      "attention": impl,
      "rows_per_device": rows, "mesh": sizes,
  }


def decode_plan(cfg, chip: Chip, slots: int, trained: bool = False) -> dict:
  """Per-device bytes of decoding with `slots` engine slots (the inference layout: weights
  over `tensor` only). The KV cache is planned as preflight plans it: every slot at the
  model's full context (a slot's capacity plus the shared prefix never exceed it).
  trained: a fine-tuned checkpoint (weights in train.dtype, LoRA adapters in
  train.param_dtype), else the base model (model.param_dtype)."""
  config, _ = model_config(cfg)
  sizes = sharding.mesh_sizes({a: cfg.mesh[a] for a in sharding.MESH_AXES}, chip.devices)
  t = cfg.train
  if trained:
    model = _abstract(config, t.dtype, t.dtype, cfg.model.scan_layers, t)
    dtype = t.dtype
  else:
    dtype = cfg.model.dtype
    model = _abstract(config, dtype, cfg.model.param_dtype or dtype, cfg.model.scan_layers)
  kv_dtype = cfg.model.kv_dtype or dtype
  dp = sizes["data"] * sizes["fsdp"]
  rows = -(-slots // dp)  # The engine rounds slots up to a multiple of data x fsdp.
  context = config.max_position_embeddings
  kv_split = sizes["tensor"] if config.num_key_value_heads % sizes["tensor"] == 0 else 1
  kv = engine.kv_bytes(config, rows, context, 0, kv_dtype) // kv_split
  chunk = -(-cfg.translate.prefill_chunk // dp)
  heads = -(-config.num_attention_heads // sizes["tensor"])
  prefill = chunk * (2 * context + chunk) * heads * 4 * 2  # float32 scores + softmax
  logits = rows * config.vocab_size * 4
  return {"weights": param_bytes(model, sizes, "inference"), "kv_cache": int(kv),
          "activations": int(prefill + logits), "rows_per_device": rows, "mesh": sizes,
          "kv_dtype": jnp.dtype(kv_dtype).name, "positions": context}


# Share of HBM a plan may fill and still count as fitting (XLA temporaries, fragmentation).
HEADROOM = 0.85
TRAIN_PARTS = ("params", "frozen_base", "adapters", "optimizer", "gradients", "fsdp_gather",
               "activations")
DECODE_PARTS = ("weights", "kv_cache", "activations")


def plan(cfg, chip: Chip) -> dict:
  """{stage: {part: bytes, ..., total, fits}} for train, translate, eval (base model) and
  eval of the fine-tuned checkpoint."""
  out = {"train": train_plan(cfg, chip),
         "translate": decode_plan(cfg, chip, cfg.translate.batch_size),
         "eval_base": decode_plan(cfg, chip, cfg.eval.batch_size),
         "eval_trained": decode_plan(cfg, chip, cfg.eval.batch_size, trained=True)}
  for name, stage in out.items():
    parts = TRAIN_PARTS if name == "train" else DECODE_PARTS
    stage["total"] = sum(stage[k] for k in parts)
    stage["fits"] = ("yes" if stage["total"] <= HEADROOM * chip.hbm else
                     "tight" if stage["total"] <= chip.hbm else "no")
  return out


COLUMNS = ("params", "frozen_base", "adapters", "optimizer", "gradients", "fsdp_gather",
           "weights", "kv_cache", "activations")


def table(cfg, chip: Chip) -> str:
  """The plan as a markdown table, GiB per device, and the lines that explain it."""
  p = plan(cfg, chip)
  config, source = model_config(cfg)
  t = cfg.train
  gib = lambda n: f"{n / GIB:.2f}" if n else "-"
  m, tr = p["train"]["mesh"], p["train"]
  lines = [
      f"{cfg.name}: {source}, {config.num_params() / 1e9:.2f}B params; {chip.name}: "
      f"{chip.note}; JAX sees {chip.devices} devices; mesh data={m['data']} fsdp={m['fsdp']} "
      f"tensor={m['tensor']}",
      f"train: method={t.method} dtype={t.dtype} param_dtype={t.param_dtype} remat={t.remat} "
      f"batch={t.batch_size} grad_accum={t.grad_accum} seq_len={t.seq_len}: "
      f"{tr['rows_per_device']} rows per device, of which attention scores "
      f"{gib(tr['scores'])} GiB (model.attention={cfg.model.attention}: {tr['attention']})",
      f"decode: model.dtype={cfg.model.dtype} kv_dtype={p['translate']['kv_dtype']}; "
      f"translate {cfg.translate.batch_size} slots ({p['translate']['rows_per_device']} per "
      f"device), eval {cfg.eval.batch_size} ({p['eval_base']['rows_per_device']} per device), "
      f"KV at {p['translate']['positions']} positions each",
      "",
      "| GiB per device | " + " | ".join(COLUMNS) + " | total | fits |",
      "|---" * (len(COLUMNS) + 3) + "|"]
  for name, stage in p.items():
    cells = [gib(stage.get(k, 0)) if k in stage else "" for k in COLUMNS]
    verdict = stage["fits"] if stage["fits"] != "no" else "**no**"
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {gib(stage['total'])} | {verdict} |")
  lines.append(f"(HBM {chip.hbm / GIB:.0f} GiB per device; 'tight' = over {HEADROOM:.0%} of it)")
  return "\n".join(lines)


def chips_table(cfg) -> str:
  """One row per chip x train.method (full, lora): GiB per device of each training part and
  the total of each stage, with the verdict."""
  gib = lambda n: f"{n / GIB:.2f}" if n else "-"
  head = ("chip (devices)", "method", "params / frozen base", "adapters", "AdamW", "grads",
          "FSDP gather", "activations", "train", "translate", "eval")
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for chip in CHIPS.values():
    for method in ("full", "lora"):
      trial = cfg.copy_and_resolve_references()
      trial.train.method = method
      p = plan(trial, chip)
      tr = p["train"]
      mark = lambda st: gib(st["total"]) + ("" if st["fits"] == "yes" else
                                            " tight" if st["fits"] == "tight" else " **no**")
      ev = max(p["eval_base"], p["eval_trained"], key=lambda st: st["total"])
      lines.append("| " + " | ".join([
          f"{chip.name} ({chip.devices} x {chip.hbm / GIB:.0f} GiB)", method,
          gib(tr["params"] or tr["frozen_base"]), gib(tr["adapters"]), gib(tr["optimizer"]),
          gib(tr["gradients"]), gib(tr["fsdp_gather"]), gib(tr["activations"]), mark(tr),
          mark(p["translate"]), mark(ev)]) + " |")
  return "\n".join(lines)


def advice(cfg, chip: Chip) -> list[str]:
  """What to change for each stage that does not fit (under HEADROOM): the smallest
  train.grad_accum that fits (micro-batches still split over data x fsdp), the most decode
  slots that fit (eval: for the fine-tuned model, the larger); [] when everything fits."""
  p, out = plan(cfg, chip), []
  budget = HEADROOM * chip.hbm
  if p["train"]["fits"] != "yes":
    dp = p["train"]["mesh"]["data"] * p["train"]["mesh"]["fsdp"]
    t = cfg.train
    for accum in range(t.grad_accum + 1, t.batch_size + 1):
      micro = t.batch_size // accum
      if t.batch_size % accum or micro % dp:
        continue
      trial = cfg.copy_and_resolve_references()
      trial.train.grad_accum = accum
      if train_plan_total(trial, chip) <= budget:
        out.append(f"train: --config.train.grad_accum={accum} ({micro // dp} rows per device)")
        break
    else:
      fused = p["train"]["attention"] in FUSED
      out.append("train: does not fit at any grad_accum; use train.method=lora"
                 + (" or a larger chip" if fused else
                    ", a larger chip, or a fused attention kernel (model.attention=auto)"))
  for name, key in (("translate", "translate.batch_size"), ("eval_trained", "eval.batch_size")):
    if p[name]["fits"] == "yes":
      continue
    stage = p[name]
    dp = stage["mesh"]["data"] * stage["mesh"]["fsdp"]
    per_row = stage["kv_cache"] // stage["rows_per_device"]
    rows = int((budget - stage["weights"] - stage["activations"]) // per_row)
    if rows >= 1:
      out.append(f"{name}: --config.{key}={rows * dp} ({rows} per device)")
    else:
      out.append(f"{name}: not one slot at full context fits beside the weights; "
                 + _tensor_advice(cfg, chip, name))
  return out


def _tensor_advice(cfg, chip: Chip, stage: str) -> str:
  """The smallest mesh.tensor (fsdp = the rest) under which `stage` fits: decoding splits
  the weights and the KV heads over it (training then splits heads and MLP over it too)."""
  size = cfg.mesh.tensor * 2
  while size <= chip.devices:
    if chip.devices % size == 0:
      trial = cfg.copy_and_resolve_references()
      trial.mesh.data, trial.mesh.fsdp, trial.mesh.tensor = 1, -1, size
      if plan(trial, chip)[stage]["fits"] == "yes":
        return f"--config.mesh.fsdp=-1 --config.mesh.tensor={size}"
    size *= 2
  return "no mesh.tensor fits; use a chip with more memory"


def train_plan_total(cfg, chip: Chip) -> int:
  t = train_plan(cfg, chip)
  return sum(t[k] for k in TRAIN_PARTS)


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from stt_jax import run_config  # pylint: disable=g-import-not-at-top
  cfg = flags.FLAGS.config
  run_config.validate(cfg)
  if flags.FLAGS.all_chips:
    print(chips_table(cfg))
    return
  chip = CHIPS[flags.FLAGS.chip]
  print(table(cfg, chip))
  for line in advice(cfg, chip):
    print("to fit:", line)


def _flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_enum("chip", "v5e-8", list(CHIPS), "TPU slice to plan for.")
  flags.DEFINE_bool("all_chips", False, "One summary row per chip x train.method instead.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _flags()
  app.run(main, argv=sys.argv)
