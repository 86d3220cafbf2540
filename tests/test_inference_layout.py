"""The inference layout: weights over `tensor` only, so the engine's compiled decode program never
all-gathers a weight, each device holds params / tensor, and greedy output is the same as
under the training (FSDP) layout. Read from the compiled HLO: deterministic, no timings."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stt_jax import decode, engine, generation, sharding
from stt_jax.models import decoder, load_hf
from tests import hf_tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "llama_gqa")


def _hlo_type(array_shape, dtype) -> str:
  return f"{jnp.dtype(dtype).name.replace('float', 'f')}[{','.join(map(str, array_shape))}]"


def compiled_decode(model, mesh, slots=8, capacity=32, prefix=16, steps=4) -> str:
  """The compiled HLO of the engine's decode program (steps decode steps of every slot, the
  shared prefix read from its one copy) on `mesh`."""
  graphdef, state = nnx.split(model)
  cfg = model.config
  cache = decoder.SlotCache.zeros(cfg, slots, capacity, model.dtype, mesh)
  shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, prefix, cfg.head_dim)
  pre = decoder.PrefixCache(k=jnp.zeros(shape), v=jnp.zeros(shape), length=jnp.int32(prefix))
  stop = decode.StopCriteria.build(cfg.vocab_size, eos_ids=(2,))
  state_rows = engine.SlotState.idle(slots, stop.sequences.shape[1], stop.table.shape[0])
  return engine._decode_program.lower(  # pylint: disable=protected-access
      graphdef, state, cache, state_rows, pre, jnp.asarray(stop.token_mask),
      jnp.asarray(stop.sequences), jnp.asarray(stop.table), jnp.float32(1), jnp.float32(1),
      jnp.int32(slots), steps=steps, greedy=True, top_k=0).compile().as_text()


def compiled_prefill(model, mesh, slots=8, capacity=32, prefix=16, tokens=16) -> str:
  """The compiled HLO of the engine's packed prefill (`tokens` prompt tokens per shard)."""
  graphdef, state = nnx.split(model)
  cfg = model.config
  cache = decoder.SlotCache.zeros(cfg, slots, capacity, model.dtype, mesh)
  shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, prefix, cfg.head_dim)
  pre = decoder.PrefixCache(k=jnp.zeros(shape), v=jnp.zeros(shape), length=jnp.int32(prefix))
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  stream = jnp.zeros((split, tokens), jnp.int32)
  rows = jnp.zeros((slots,), jnp.int32)
  return engine._prefill_program.lower(  # pylint: disable=protected-access
      graphdef, state, cache, engine.SlotState.idle(slots, 4, 1), pre, stream, stream, stream,
      rows, rows, rows, jnp.zeros((slots, 2), jnp.uint32), jnp.int32(0), jnp.float32(1),
      jnp.float32(1), greedy=True, top_k=0).compile().as_text()


def gathered_weights(model, hlo: str) -> set[str]:
  """Weight shapes (as HLO types) that some all-gather in `hlo` produces in full. A stacked
  layer parameter (scan_layers) counts per layer: the scan body gathers one layer's row."""
  weights = set()
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = v.get_value().shape
    if v.get_metadata().get("logical_axes", ())[:1] == ("layers",):
      shape = shape[1:]
    if len(shape) >= 2:
      weights.add(_hlo_type(shape, v.get_value().dtype))
  produced = set(re.findall(r"= (\w+\[[\d,]*\])\{?[^ ]* all-gather\(", hlo))
  return weights & produced


def device_bytes(model, device) -> int:
  return sum(s.data.nbytes for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
             for s in v.get_value().addressable_shards if s.device == device)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("shape", [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}])
def test_decode_and_prefill_never_gather_a_weight_in_the_inference_layout(folder, shape, scan):
  mesh = sharding.make_mesh(shape)
  train_model, _ = load_hf(folder, mesh=mesh, scan_layers=scan)
  assert gathered_weights(train_model, compiled_decode(train_model, mesh))  # The control.
  model, _ = load_hf(folder, mesh=mesh, layout="inference", scan_layers=scan)
  assert gathered_weights(model, compiled_decode(model, mesh)) == set()
  assert gathered_weights(model, compiled_prefill(model, mesh)) == set()


def test_each_device_holds_params_over_tensor(folder):
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  model, _ = load_hf(folder, mesh=mesh, layout="inference")
  expected, total = 0, 0
  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = v.get_value()
    spec = [a for part in value.sharding.spec if part
            for a in (part if isinstance(part, tuple) else (part,))]
    assert set(spec) <= {"tensor"}, (v.get_metadata().get("logical_axes"), spec)
    total += value.nbytes
    expected += value.nbytes // (2 if "tensor" in spec else 1)
  assert device_bytes(model, mesh.devices.flat[0]) == expected
  assert total / 2 <= expected < total  # Matrices halve; norms stay whole.
  train_model, _ = load_hf(folder, mesh=mesh)
  assert device_bytes(train_model, mesh.devices.flat[0]) < expected  # FSDP spreads further.


def test_greedy_output_is_the_same_in_both_layouts(folder):
  tok = hf_tiny.byte_tokenizer()
  mesh = sharding.make_mesh({"fsdp": 8})
  prompts = ["abc", "hello there", "x" * 30, "a b c d e f", "q", "zz", "tokens!", "end"]
  out = {}
  for layout in ("train", "inference"):
    model, _ = load_hf(folder, mesh=mesh, layout=layout)
    out[layout] = generation.generate(model, tok, prompts, max_new_tokens=12, stop=())
  assert out["train"] == out["inference"]


def test_unknown_layout_is_one_line(folder):
  with pytest.raises(sharding.ShardingError, match="unknown layout 'serve'"):
    load_hf(folder, mesh=sharding.make_mesh(), layout="serve")
  np.testing.assert_equal(sorted(sharding.LAYOUTS), ["inference", "train"])


def test_preflight_plans_decoding_memory_and_refuses_what_does_not_fit(folder):
  from stt_jax import preflight, run_config  # pylint: disable=g-import-not-at-top
  cfg = run_config.get_config()
  cfg.model.path, cfg.model.dtype = folder, "float32"
  cfg.mesh.fsdp, cfg.mesh.tensor = 4, 2
  cfg.translate.batch_size, cfg.eval.batch_size = 8, 16
  model, _ = load_hf(folder, mesh=sharding.local_mesh(cfg.mesh), layout="inference")
  plan = preflight.check_inference_memory(cfg)  # CPU: memory unknown, only logged.
  assert plan["weights"] == device_bytes(model, jax.local_devices()[0])
  config = model.config
  assert plan["rows"] == 4  # 16 eval rows over data x fsdp = 4.
  assert plan["kv_cache"] == (2 * config.num_hidden_layers * config.num_key_value_heads // 2 *
                              config.head_dim * 4 * 4 * config.max_position_embeddings)
  need = plan["weights"] + plan["kv_cache"]
  assert preflight.check_inference_memory(cfg, device_memory=need) == plan
  with pytest.raises(preflight.PreflightError) as e:
    preflight.check_inference_memory(cfg, device_memory=need - 1)
  message = str(e.value)
  assert "\n" not in message and message.startswith("config: mesh.data=1, mesh.fsdp=4, "
                                                    "mesh.tensor=2: decoding needs")
  assert "--config.mesh.tensor=" in message
