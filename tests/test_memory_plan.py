"""memory_plan: its parameter, adapter and KV bytes are those of the real arrays (a tiny
model placed on the 8 emulated devices), and the plan is consistent (FSDP divides the
training state by the devices, the inference layout only by tensor, bf16 halves float32)."""

import jax
import numpy as np
import pytest
from flax import nnx

from stt_jax import memory_plan, run_config, sharding, train
from stt_jax.models import attention, load_hf
from tests import hf_tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "llama_gqa")


def _cfg(folder="", **mesh):
  cfg = run_config.get_config()
  cfg.model.path = folder
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (mesh.get(a, d) for a, d in
                                                   (("data", 1), ("fsdp", -1), ("tensor", 1)))
  return cfg


def _device0_bytes(model, kind=nnx.Param) -> int:
  """Bytes of `kind` variables held by the first device."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for _, v in nnx.to_flat_state(nnx.state(model, kind))
             for s in v.get_value().addressable_shards if s.device == device)


CPU8 = memory_plan.Chip("cpu-8", 8, 2**40, "8 emulated CPU devices")


@pytest.mark.parametrize("mesh", [dict(fsdp=8), dict(fsdp=4, tensor=2), dict(data=2, fsdp=4)])
def test_parameter_bytes_are_the_arrays_bytes(folder, mesh):
  cfg = _cfg(folder, **mesh)
  cfg.model.dtype = "float32"
  devices = sharding.config_mesh(cfg.mesh)
  sizes = dict(devices.shape)
  config, _ = memory_plan.model_config(cfg)
  for layout in ("train", "inference"):
    model, _ = load_hf(folder, mesh=devices, dtype="bfloat16", param_dtype="float32",
                       layout=layout)
    abstract = memory_plan._abstract(  # pylint: disable=protected-access
        config, "bfloat16", "float32", True)
    assert memory_plan.param_bytes(abstract, sizes, layout) == _device0_bytes(model)
  # LoRA as training builds it: a bf16 frozen base and float32 adapters.
  cfg.train.method, cfg.train.dtype, cfg.train.lora.rank = "lora", "bfloat16", 4
  real = train._prepare_model(folder, cfg.train, devices)  # pylint: disable=protected-access
  plan = memory_plan.train_plan(cfg, CPU8)
  assert plan["adapters"] == _device0_bytes(real, nnx.LoRAParam) > 0
  assert plan["frozen_base"] == _device0_bytes(real) - plan["adapters"]
  assert plan["optimizer"] == 2 * plan["adapters"] and plan["params"] == 0


def test_kv_bytes_are_the_engine_cache_arrays(folder):
  from stt_jax import engine  # pylint: disable=g-import-not-at-top
  from stt_jax.models.decoder import SlotCache  # pylint: disable=g-import-not-at-top
  cfg = _cfg(folder, fsdp=4, tensor=2)
  cfg.model.kv_dtype = "bfloat16"
  cfg.translate.batch_size = 8
  plan = memory_plan.decode_plan(cfg, CPU8, cfg.translate.batch_size)
  config, _ = memory_plan.model_config(cfg)
  mesh = sharding.config_mesh(cfg.mesh)
  cache = jax.jit(lambda: SlotCache.zeros(config, 8, config.max_position_embeddings,
                                          "bfloat16", mesh))()
  device = jax.devices()[0]
  real = sum(s.data.nbytes for a in (cache.k, cache.v) for s in a.addressable_shards
             if s.device == device)
  assert plan["kv_cache"] == real
  assert plan["rows_per_device"] == 2
  assert engine.kv_bytes(config, 8, config.max_position_embeddings, 0, "bfloat16") == 8 * real


def test_plan_is_consistent_for_llama2_7b():
  cfg = run_config.paper_config("mgsm", "de")
  cfg.train.method = "full"
  config, source = memory_plan.model_config(cfg)
  assert source.startswith("Llama-2-7B") and config.num_params() == 6_738_415_616
  one = memory_plan.Chip("one", 1, 2**40, "one device")
  whole = memory_plan.train_plan(cfg, one)
  assert whole["params"] == 4 * config.num_params()  # float32 master weights.
  for chip in memory_plan.CHIPS.values():
    p = memory_plan.train_plan(cfg, chip)
    assert p["mesh"]["fsdp"] == chip.devices
    # Every Llama-2-7B weight dimension sharded over fsdp divides by 4 and 8; norms (4096
    # floats per layer) are replicated.
    norms = 4 * (2 * config.num_hidden_layers + 1) * config.hidden_size
    assert p["params"] - norms == (whole["params"] - norms) // chip.devices
    assert p["optimizer"] == 2 * p["params"] and p["gradients"] == p["params"]
    d = memory_plan.decode_plan(cfg, chip, 8)
    assert d["weights"] == 2 * config.num_params()  # bf16, replicated over fsdp.
  cfg.mesh.fsdp, cfg.mesh.tensor = -1, 2
  halved = memory_plan.decode_plan(cfg, memory_plan.CHIPS["v5e-8"], 8)
  assert halved["weights"] < 0.51 * 2 * config.num_params()
  cfg.model.kv_dtype = "float32"
  wide = memory_plan.decode_plan(cfg, memory_plan.CHIPS["v5e-8"], 8)
  assert wide["kv_cache"] == 2 * halved["kv_cache"]
  cfg.train.grad_accum = 2
  assert memory_plan.train_plan(cfg, memory_plan.CHIPS["v5e-8"])["gradients"] == \
      2 * memory_plan.train_plan(cfg, memory_plan.CHIPS["v5e-8"])["params"]


def test_table_names_the_chip_and_what_to_change():
  cfg = run_config.paper_config("mgsm", "th")
  run_config.validate(cfg)
  text = memory_plan.table(cfg, memory_plan.CHIPS["v5e-8"])
  assert "JAX sees 8 devices" in text and "| train |" in text and "| eval_trained |" in text
  assert "attention scores 0.00 GiB (model.attention=auto: splash)" in text
  advice = memory_plan.advice(cfg, memory_plan.CHIPS["v5e-8"])
  assert not any(a.startswith("train:") for a in advice)  # Splash: no [heads, L, L] scores.
  assert any("--config.mesh.tensor=2" in a for a in advice)  # Decoding: weights + one slot.
  cfg.model.attention = "xla"  # The XLA attention materialises them: 8 Thai rows do not fit.
  assert any(a.startswith("train: --config.train.grad_accum=")
             for a in memory_plan.advice(cfg, memory_plan.CHIPS["v5e-8"]))
  cfg.model.attention = "cudnn"
  with pytest.raises(attention.AttentionError, match="model.attention='cudnn'"):
    memory_plan.train_plan(cfg, memory_plan.CHIPS["v5e-8"])
  cfg.model.attention = "auto"
  cfg.mesh.tensor = 2
  assert all(s["fits"] == "yes" for s in memory_plan.plan(cfg, memory_plan.CHIPS["v5e-8"]).values()
             if "weights" in s)
  rows = memory_plan.chips_table(cfg).splitlines()[2:]
  assert len(rows) == 2 * len(memory_plan.CHIPS) and "| v4-8 (4 x 32 GiB) | full |" in rows[0]
  cfg.mesh.tensor = 1
  fits = memory_plan.plan(cfg, memory_plan.CHIPS["v5p-8"])
  assert fits["translate"]["fits"] == "yes"
  np.testing.assert_equal(sorted(memory_plan.CHIPS), ["v4-8", "v5e-8", "v5p-8", "v6e-8"])
