"""The continuous-batching engine: with more prompts than slots (slots refilled mid-run),
prompts longer than a prefill chunk and a shared prefix, greedy tokens equal transformers and
the batch-synchronous Decoder; per-row budgets; seeded sampling independent of the slot a
prompt lands in; one call compiles three programs; the prefix's KV is stored once."""

import numpy as np
import pytest

from stt_jax import decode, engine, sharding
from stt_jax.models import load_hf
from tests import hf_tiny
from tests.test_decode import hf_greedy, prompts_of

NEW = 10


def run(eng, prompts, budgets=NEW, sampling=decode.Sampling(), eos=()):
  crit = decode.StopCriteria.build(eng.model.config.vocab_size, eos)
  return {i: (ids, stopped) for i, ids, stopped in eng.generate(prompts, budgets, crit, sampling)}


def with_prefix(prompts, seed=9, n=40):
  common = prompts_of([n], seed=seed)[0]
  return [common + p for p in prompts]


@pytest.mark.parametrize("kind", ["qwen2", "mistral_window", "gemma2"])  # Windows reach the prefix.
def test_refilled_slots_equal_transformers_and_the_static_decoder(kind, tmp_path_factory):
  folder = hf_tiny.tmp_model(tmp_path_factory, kind)
  model, _ = load_hf(folder)
  prompts = with_prefix(prompts_of([5, 17, 1, 40, 3, 9, 22, 2, 8, 30]))
  eng = engine.Engine(model, slots=4, steps_per_call=3, prefill_chunk=16, refill_rows=2)
  got = run(eng, prompts)
  assert eng.stats.decode_calls > NEW // 3 + 1  # Slots were refilled between calls.
  assert [got[i][0] for i in range(len(prompts))] == hf_greedy(folder, prompts, NEW)
  unrolled, _ = load_hf(folder, scan_layers=False)  # Scanned layers (the default) == unrolled.
  assert run(engine.Engine(unrolled, slots=4, steps_per_call=3, prefill_chunk=16,
                           refill_rows=2), prompts) == got
  static = decode.Decoder(model, batch_size=4)
  crit = decode.StopCriteria.build(model.config.vocab_size, ())
  assert {i: ids for i, ids in static.generate_ids(prompts, NEW, crit)} == {
      i: ids for i, (ids, _) in got.items()}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  model, _ = load_hf(hf_tiny.tmp_model(tmp_path_factory, "qwen2"))
  return model


def test_per_row_budgets_stop_each_row_at_its_own(qwen):
  prompts = prompts_of([6, 3, 12, 8, 2, 7], seed=1)
  eng = engine.Engine(qwen, slots=2, steps_per_call=4, prefill_chunk=8)
  free = run(eng, prompts, 12)
  budgets = [1, 12, 3, 7, 2, 5]
  got = run(eng, prompts, budgets)
  for i, b in enumerate(budgets):
    assert got[i] == (free[i][0][:b], False)  # Used its whole budget: not stopped.
  # EOS inside a row's budget ends it there, stopped; the others run to their budgets.
  eos = free[1][0][4]
  ended = run(eng, prompts, budgets, eos=(eos,))
  assert ended[1] == (free[1][0][:free[1][0].index(eos) + 1], True)


def test_sampling_does_not_depend_on_slots_or_calls(qwen):
  prompts = with_prefix(prompts_of([4, 9, 15, 2, 7, 11], seed=4))
  s = decode.Sampling(temperature=1.0, top_p=0.9, seed=3)
  a = run(engine.Engine(qwen, slots=2, steps_per_call=3, prefill_chunk=8), prompts, NEW, s)
  b = run(engine.Engine(qwen, slots=8, steps_per_call=7, prefill_chunk=32), prompts, NEW, s)
  c = run(engine.Engine(qwen, slots=8), prompts, NEW, decode.Sampling(1.0, 0, 0.9, seed=4))
  assert a == b and a != c


def test_one_call_compiles_three_programs_and_sharded_equals_unsharded(qwen, tmp_path_factory):
  prompts = with_prefix(prompts_of([3, 50, 7, 21, 2, 33, 8, 5, 14, 70, 1], seed=5))
  budgets = [4, 11, 9, 16, 2, 7, 13, 5, 3, 8, 10]
  eng = engine.Engine(qwen, slots=4, steps_per_call=4, prefill_chunk=16)
  plain = run(eng, prompts, budgets)
  assert sorted(name for name, _ in eng.compiled) == ["decode", "prefill", "prefix"]
  again = run(eng, prompts[:5], budgets[:5])  # Smaller work reuses the programs.
  assert len(eng.compiled) == 3 and again == {i: plain[i] for i in range(5)}
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded, _ = load_hf(hf_tiny.tmp_model(tmp_path_factory, "qwen2"), mesh=mesh,
                       layout="inference")
  assert run(engine.Engine(sharded, slots=4, steps_per_call=4, prefill_chunk=16), prompts,
             budgets) == plain


def test_prefix_is_stored_once(qwen):
  """16 slots of an 8-shot-sized prefix: the slot cache holds only each slot's own tokens."""
  cfg = qwen.config
  per_token = engine.kv_bytes(cfg, 1, 1, 0, np.float32)
  with_copies = engine.kv_bytes(cfg, 16, 600 + 64 + 256, 0, np.float32)
  shared = engine.kv_bytes(cfg, 16, 64 + 256, 600, np.float32)
  assert with_copies == 16 * (600 + 64 + 256) * per_token
  assert shared == (16 * (64 + 256) + 600) * per_token
  eng = engine.Engine(qwen, slots=4, steps_per_call=4, prefill_chunk=16)
  prompts = with_prefix(prompts_of([3, 7, 5, 9], seed=6), n=60)
  run(eng, prompts, 4)
  assert eng.prefix_len >= 59 and eng.capacity < 59  # Slots hold suffix + budget only.


def test_bad_requests_are_one_line_errors(qwen):
  eng = engine.Engine(qwen, slots=2)
  with pytest.raises(decode.DecodeError, match="2 budgets for 3 prompts"):
    run(eng, prompts_of([3, 4, 5]), [4, 4])
  with pytest.raises(decode.DecodeError, match="max_new_tokens must be >= 1"):
    run(eng, prompts_of([3]), 0)
  with pytest.raises(decode.DecodeError, match="empty prompt"):
    run(eng, [[]], 4)
  assert run(eng, [], 4) == {}
