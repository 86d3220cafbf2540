"""model.kv_dtype: decoding with a bfloat16 KV cache under a float32 model. The caches the
engine and the batch decoder build hold that dtype (read from the arrays the programs get and
from the compiled HLO), greedy tokens equal the float32 cache's on a tiny model, the preflight
plan counts the narrower cache, and the run config accepts only the known dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax import decode, engine, preflight, run_config, sharding
from stt_jax.models import load_hf
from tests import hf_tiny
from tests.test_decode import prompts_of
from tests.test_engine import with_prefix

NEW = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "llama_gqa")


@pytest.fixture(scope="module")
def model(folder):
  return load_hf(folder)[0]  # float32 weights and compute.


def _greedy(eng, prompts):
  crit = decode.StopCriteria.build(eng.model.config.vocab_size, ())
  return {i: ids for i, ids, _ in eng.generate(prompts, NEW, crit)}


def test_engine_bf16_cache_holds_bf16_and_decodes_the_float32_tokens(model, monkeypatch):
  seen = []
  decode_program = engine._decode_program  # pylint: disable=protected-access

  def spy(graphdef, state, cache, slots, prefix, **kw):
    seen.append((cache.k.dtype, cache.v.dtype, prefix.k.dtype, prefix.v.dtype))
    return decode_program(graphdef, state, cache, slots, prefix, **kw)

  monkeypatch.setattr(engine, "_decode_program", spy)
  prompts = with_prefix(prompts_of([3, 9, 5, 12], seed=3), n=40)  # A shared prefix too.
  wide = _greedy(engine.Engine(model, slots=2, steps_per_call=4, prefill_chunk=16), prompts)
  assert seen and set(seen) == {(jnp.dtype(jnp.float32),) * 4}
  seen.clear()
  narrow_engine = engine.Engine(model, slots=2, steps_per_call=4, prefill_chunk=16,
                                kv_dtype="bfloat16")
  narrow = _greedy(narrow_engine, prompts)
  assert seen and set(seen) == {(jnp.dtype(jnp.bfloat16),) * 4}
  assert narrow == wide


def test_batch_decoder_bf16_cache_in_the_compiled_program(model):
  prompts = prompts_of([4, 11, 7], seed=5)
  crit = decode.StopCriteria.build(model.config.vocab_size, ())
  wide = decode.Decoder(model, batch_size=4).run_batch(prompts, NEW, crit, decode.Sampling())
  dec = decode.Decoder(model, batch_size=4, kv_dtype=jnp.bfloat16)
  assert dec.run_batch(prompts, NEW, crit, decode.Sampling()) == wide
  cfg = model.config
  ids, mask = decode.left_pad(prompts, 16, rows=4)
  hlo = decode._decode_batch.lower(  # pylint: disable=protected-access
      dec.graphdef, dec.state, jnp.zeros((1, 0), jnp.int32), jnp.zeros((1, 0), bool),
      jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0), jnp.float32(1),
      jnp.float32(1), jnp.asarray(crit.token_mask), jnp.asarray(crit.sequences),
      jnp.asarray(crit.table), max_new_tokens=NEW, greedy=True, top_k=0,
      kv_dtype=dec.kv_dtype).compile().as_text()
  shape = (cfg.num_hidden_layers, 4, cfg.num_key_value_heads, 16 + NEW, cfg.head_dim)
  cache = ",".join(map(str, shape))
  # The loops (prefill over layers, decode steps) carry the cache as bf16; a float32 copy of
  # a whole layer's slice may only exist inside a fusion, never as loop state.
  loops = [line.split(" while(")[0] for line in hlo.splitlines() if " while(" in line]
  assert loops and all(f"bf16[{cache}]" in line for line in loops)
  assert not any(f"f32[{cache}]" in line for line in loops)


def test_bf16_logits_stay_close_to_float32(model):
  """What the equal tokens above rest on: one cached decode step's float32 logits move by
  less than 1% of the largest logit (bf16 keeps 8 significant bits: each stored key/value is
  rounded by up to 2^-9 relative; measured 0.6% on this 2-layer model). Greedy tokens of a
  real model can still flip where two logits are closer than that."""
  cfg = model.config
  ids, mask = decode.left_pad(prompts_of([6, 10], seed=8), 16)
  pos = decode.positions_from_mask(jnp.asarray(mask))
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    cache = decode.KVCache.zeros(cfg, 2, 17, dtype)
    _, cache = model.forward_cached(jnp.asarray(ids), jnp.asarray(mask), pos, cache)
    assert cache.k.dtype == dtype and cache.v.dtype == dtype
    nxt = jnp.asarray([[7], [9]], jnp.int32)
    logits, _ = model.forward_cached(nxt, jnp.ones((2, 1), bool), pos[:, -1:] + 1, cache)
    out[jnp.dtype(dtype).name] = np.asarray(logits)
  scale = np.abs(out["float32"]).max()
  np.testing.assert_allclose(out["bfloat16"], out["float32"], rtol=0, atol=1e-2 * scale)
  assert not np.array_equal(out["bfloat16"], out["float32"])  # The cache really is narrower.


def test_preflight_plans_the_kv_dtype(folder):
  cfg = run_config.get_config()
  cfg.model.path, cfg.model.dtype = folder, "float32"
  mesh = sharding.local_mesh(cfg.mesh)
  wide = preflight.inference_plan(cfg, mesh)
  cfg.model.kv_dtype = "bfloat16"
  narrow = preflight.inference_plan(cfg, mesh)
  assert (wide["kv_dtype"], narrow["kv_dtype"]) == ("float32", "bfloat16")
  assert narrow["kv_cache"] * 2 == wide["kv_cache"] and narrow["weights"] == wide["weights"]


def test_config_accepts_only_known_kv_dtypes():
  cfg = run_config.get_config()
  assert cfg.model.kv_dtype == ""
  for ok in ("", "float32", "bfloat16", "float16"):
    cfg.model.kv_dtype = ok
    run_config.validate(cfg)
  cfg.model.kv_dtype = "int8"
  with pytest.raises(run_config.ConfigKeyError, match="'model.kv_dtype' = 'int8' is not one of"):
    run_config.validate(cfg)
  cfg.model.kv_dtype = "bf16"
  with pytest.raises(run_config.ConfigKeyError, match="model.kv_dtype"):
    run_config.validate(cfg)
