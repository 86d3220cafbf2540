"""Decoding: token-identical to transformers greedy, batched == single, sharded == unsharded,
stop conditions (stop strings exact on both fixture tokenizers) and context-length policy."""

import math
import os
import random

import numpy as np
import pytest
import torch
import transformers

from stt_jax import decode, generation, sharding
from stt_jax.models import load_hf
from tests import hf_tiny

NEW = 12


def hf_greedy(folder, prompts, max_new_tokens=NEW, eos=None):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager")
  width = max(len(p) for p in prompts)
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros((len(prompts), width), dtype=torch.long)
  for r, p in enumerate(prompts):
    ids[r, width - len(p):] = torch.tensor(p)
    mask[r, width - len(p):] = 1
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=0, min_new_tokens=0)
  res = []
  for row in out[:, width:].tolist():
    if eos is not None and eos in row:
      row = row[:row.index(eos) + 1]
    res.append(row)
  return res


def prompts_of(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [list(map(int, rng.integers(3, hf_tiny.VOCAB, size=n))) for n in lengths]


@pytest.fixture(scope="module", params=["llama_gqa", "llama3_rope", "mistral_window", "qwen2",
                                        "llama_head_dim_tied", "gemma2", "gemma3"])
def tiny(request, tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, request.param)


def test_greedy_token_identical_to_transformers(tiny):
  prompts = prompts_of([5, 17, 9, 1])
  expected = hf_greedy(tiny, prompts)
  model, _ = load_hf(tiny)
  got = generation.generate_tokens(model, prompts, max_new_tokens=NEW, eos_ids=(), batch_size=4)
  assert got == expected


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  return hf_tiny.tmp_model(tmp_path_factory, "qwen2")


def test_batched_equals_single_and_sharded_equals_unsharded(qwen):
  prompts = prompts_of([3, 20, 7, 11, 2, 30, 8, 5, 14], seed=1)
  model, _ = load_hf(qwen)
  single = [generation.generate_tokens(model, [p], NEW, eos_ids=(), batch_size=1)[0]
            for p in prompts]
  batched = generation.generate_tokens(model, prompts, NEW, eos_ids=(), batch_size=4)
  assert batched == single
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded_model, _ = load_hf(qwen, mesh=mesh)
  sharded = generation.generate_tokens(sharded_model, prompts, NEW, eos_ids=(), batch_size=8)
  assert sharded == single


def test_eos_and_stop_conditions(qwen):
  model, _ = load_hf(qwen)
  prompt = prompts_of([6], seed=2)
  free = generation.generate_tokens(model, prompt, NEW, eos_ids=())[0]
  assert len(free) == NEW
  eos = free[3]
  first = free.index(eos)
  with_eos = generation.generate_tokens(model, prompt, NEW, eos_ids=(eos,))[0]
  assert with_eos == free[:first + 1]
  assert hf_greedy(qwen, prompt, eos=eos)[0] == with_eos
  # A stop token and a two-token stop sequence end the row right after them.
  assert generation.generate_tokens(model, prompt, NEW, eos_ids=(), stop_token_ids=(free[5],))[0] \
      == free[:free.index(free[5]) + 1]
  seq = free[6:8]
  hit = next(i for i in range(1, NEW) if free[i - 1:i + 1] == seq)
  assert generation.generate_tokens(model, prompt, NEW, eos_ids=(), stop_sequences=(seq,))[0] \
      == free[:hit + 1]
  # max_new_tokens bounds the output.
  assert generation.generate_tokens(model, prompt, 3, eos_ids=())[0] == free[:3]


def test_empty_list_and_long_prompt(qwen):
  model, config = load_hf(qwen)
  assert generation.generate_tokens(model, [], NEW) == []
  too_long = prompts_of([config.max_position_embeddings], seed=3)
  with pytest.raises(decode.DecodeError, match=r"prompt 0 has 256 tokens.*truncate='left'"):
    generation.generate_tokens(model, too_long, NEW)
  # The documented policy keeps the last tokens.
  cut = generation.generate_tokens(model, too_long, NEW, truncate="left", eos_ids=())[0]
  kept = too_long[0][-(config.max_position_embeddings - NEW):]
  assert cut == generation.generate_tokens(model, [kept], NEW, eos_ids=())[0]


def test_sampling_is_seeded_and_top_k_1_is_greedy(qwen):
  model, _ = load_hf(qwen)
  prompts = prompts_of([4, 9], seed=4)
  greedy = generation.generate_tokens(model, prompts, NEW, eos_ids=())
  a = generation.generate_tokens(model, prompts, NEW, eos_ids=(), temperature=1.0, seed=7)
  b = generation.generate_tokens(model, prompts, NEW, eos_ids=(), temperature=1.0, seed=7)
  c = generation.generate_tokens(model, prompts, NEW, eos_ids=(), temperature=1.0, seed=8)
  assert a == b and a != c
  assert generation.generate_tokens(model, prompts, NEW, eos_ids=(), temperature=1.0,
                                top_k=1) == greedy
  assert generation.generate_tokens(model, prompts, NEW, eos_ids=(), temperature=1.0,
                                top_p=1e-6) == greedy


def test_trim_text():
  assert decode.trim_text("你好\n世界", ["\n"]) == "你好"
  assert decode.trim_text("abc German: x", ["\n", "German:"]) == "abc "
  assert decode.trim_text("no stop", ["\n"]) == "no stop"


def test_next_pow2_bucket_length_and_left_pad():
  from stt_jax import translate  # pylint: disable=g-import-not-at-top
  twin = getattr(translate, "_next_pow2", None)  # What next_pow2 replaces there.
  for n in range(5001):
    assert decode.next_pow2(n, 16) == max(16, 1 << max(0, n - 1).bit_length())
    assert twin is None or decode.next_pow2(n, 16) == twin(n)
  for n in range(1, 5001):
    assert decode.next_pow2(n) == 1 << math.ceil(math.log2(n))
  assert [decode.bucket_length(n) for n in (0, 16, 17, 256, 257, 4096)] == [
      16, 16, 32, 256, 512, 4096]
  ids, mask = decode.left_pad([[1, 2], [], [3]], 4, rows=5)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape == (5, 4)
  assert ids.tolist() == [[0, 0, 1, 2], [0] * 4, [0, 0, 0, 3], [0] * 4, [0] * 4]
  assert mask.sum(1).tolist() == [2, 0, 1, 0, 0] and mask[0, 2:].all()
  assert decode.left_pad([[]], 0)[0].shape == (1, 0)
  with pytest.raises(decode.DecodeError, match="more than 2"):
    decode.left_pad([[1, 2, 3]], 2)


def test_rate_bar_counts_items_tokens_and_time():
  with decode.RateBar(5, "t", disable=True) as bar:
    bar.update(2, 30)
    bar.update(3, 12)
  assert (bar.items, bar.tokens) == (5, 42) and bar.seconds > 0
  assert bar.tokens_per_s == pytest.approx(42 / bar.seconds)


def test_text_generate_matches_transformers_and_trims_stops(qwen):
  tok = hf_tiny.byte_tokenizer()
  model, _ = load_hf(qwen)
  texts = ["English: cat\nGerman:", "Hello", "x" * 40]
  ids = [tok.encode(t, add_special_tokens=False) for t in texts]
  raw = hf_greedy(qwen, ids, max_new_tokens=NEW, eos=2)
  expected = []
  for row in raw:
    row = row[:-1] if row and row[-1] == 2 else row
    expected.append(decode.trim_text(tok.decode(row), ["o", "\n"]))
  got = generation.generate(model, tok, texts, max_new_tokens=NEW, stop=("o", "\n"),
                        add_special_tokens=False, batch_size=2)
  assert got == expected
  # Rows that hit a stop token end early on device: all stopped rows' texts lack the stop.
  assert all("o" not in g and "\n" not in g for g in got)


def test_shared_prefix_is_prefilled_once_with_identical_output(qwen):
  model, _ = load_hf(qwen)
  common = prompts_of([45], seed=5)[0]
  prompts = [common + s for s in prompts_of([3, 9, 1, 6], seed=6)]
  dec = decode.Decoder(model, batch_size=4)
  assert dec.shared_prefix_len(prompts) == 45
  crit = decode.StopCriteria.build(model.config.vocab_size)
  shared = dec.run_batch(prompts, NEW, crit, decode.Sampling())
  plain = decode.Decoder(model, batch_size=4, share_prefix=False).run_batch(
      prompts, NEW, crit, decode.Sampling())
  assert shared == plain == hf_greedy(qwen, prompts)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded, _ = load_hf(qwen, mesh=mesh)
  assert decode.Decoder(sharded, batch_size=8).run_batch(prompts, NEW, crit,
                                                         decode.Sampling()) == shared
  # A prompt that is entirely the common prefix keeps one token of its own.
  assert decode.Decoder(model, batch_size=4).shared_prefix_len([common, common + [5]]) == 44


# ------------------------------------------------------------------------------ stop strings


def rigged(kind: str, folder: str, chain, after: int | None = None, **overrides) -> str:
  """A tiny Llama whose greedy output is fixed: `chain` (distinct ids) in order after any
  other token, then `after` (default: the chain again). All layer outputs are zeroed, so the
  next token depends only on the current one (embedding one-hot -> lm_head row)."""
  hf_tiny.make_tiny("llama_gqa", folder, vocab_size=hf_tiny.vocab_size(kind), **overrides)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  assert len(set(chain)) == len(chain) < 63, chain
  after = chain[0] if after is None else after
  with torch.no_grad():
    for layer in model.model.layers:
      layer.self_attn.o_proj.weight.zero_()
      layer.mlp.down_proj.weight.zero_()
    model.model.norm.weight.fill_(1.0)
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    emb.zero_()
    emb[:, 63] = 1.0  # Any other token: dimension 63, followed by chain[0].
    head.zero_()
    head[chain[0], 63] = 10.0
    for d, t in enumerate(chain):
      emb[t] = 0.0
      emb[t, d] = 1.0
      head[chain[d + 1] if d + 1 < len(chain) else after, d] = 10.0
  model.save_pretrained(folder)
  return folder


def first_stop(tok, ids, stops):
  """Brute force: tokens until the decoded text first contains a stop string."""
  for n in range(1, len(ids) + 1):
    text = tok.decode(ids[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if any(s in text for s in stops):
      return n
  return None


def test_stop_table_matches_substring_search():
  """The automaton fires exactly when the text first contains a stop (overlaps, borders,
  empty tokens, a first token whose leading space the decoder drops)."""
  ctx = [b"a", b"aa", b"b", b"ab", b"aab", b"x", b"", b" a", b"ba", b"aaab", b" "]
  lone = ctx[:7] + [b"a"] + ctx[8:10] + [b""]
  texts = decode.TokenBytes(ctx, lone)
  stops = ("aab", "aa", " a", "abab", "baab")

  def simulate(table, seq):
    state = [table.shape[1] - 1] * table.shape[0]
    for n, t in enumerate(seq):
      state = [int(table[i, s, t]) for i, s in enumerate(state)]
      if min(state) < 0:
        return n + 1
    return None

  def brute(stop, seq):
    text = b""
    for n, t in enumerate(seq):
      text += ctx[t] if text or any(ctx[u] for u in seq[:n]) else lone[t]
      if stop.encode() in text:
        return n + 1
    return None

  assert simulate(decode.build_stop_table(texts, ("aab",)), [0, 0, 0, 2]) == 4  # a a a|b
  assert simulate(decode.build_stop_table(texts, ("aab",)), [1, 3]) == 2  # aa|ab
  assert simulate(decode.build_stop_table(texts, ("aab",)), [0, 9]) == 2  # a|aaab
  assert simulate(decode.build_stop_table(texts, (" a",)), [7]) is None  # lone 'a'
  assert simulate(decode.build_stop_table(texts, (" a",)), [6, 7]) is None  # empty first
  assert simulate(decode.build_stop_table(texts, (" a",)), [10, 7]) == 2  # ' ' dropped
  rng = random.Random(0)
  for stop in stops:
    table = decode.build_stop_table(texts, (stop,))
    assert table.dtype == np.int8 and table.shape == (1, 8, len(ctx))
    for _ in range(300):
      seq = [rng.randrange(len(ctx)) for _ in range(rng.randrange(1, 8))]
      assert simulate(table, seq) == brute(stop, seq), (stop, seq)
  both = decode.build_stop_table(texts, stops, vocab_size=len(ctx) + 3)
  assert both.shape == (len(stops), 8, len(ctx) + 3)
  assert simulate(both, [len(ctx), 0, len(ctx) + 1, 0]) == 4  # out-of-vocab ids change nothing
  assert decode.build_stop_table(texts, ("",)) is None


@pytest.mark.parametrize("kind", hf_tiny.TOKENIZERS)
def test_stop_strings_end_at_the_right_token(kind, tmp_path):
  """Stop strings of several tokens end decoding on device at the token that completes them
  (Llama-2 SentencePiece: the '▁' space and <0x0A> byte pieces), counted in tokens."""
  tok = hf_tiny.tokenizer(kind)
  nl = tok.encode("a\n", add_special_tokens=False)[-1]
  assert tok.decode([nl]) == "\n"
  budget = 24
  model, _ = load_hf(rigged(kind, os.fspath(tmp_path / "nl"), [nl]))
  run = lambda stop, n=budget: generation.generate(model, tok, ["Hi"], n, stop=stop,
                                               details=True)[0]
  assert run(("\n\n",)) == generation.Completion("", 2, True)
  assert run(("\n\n\n",)) == generation.Completion("", 3, True)
  assert run(()) == generation.Completion("\n" * budget, budget, False)

  chain = tok.encode("Lab 7.\nQuestion:", add_special_tokens=False)
  prompt = "xyz"
  assert not set(tok.encode(prompt + "zz")) & set(chain)
  model, _ = load_hf(rigged(kind, os.fspath(tmp_path / "chain"), chain))
  looped = (chain * 3)[:budget]
  for stops in [("\nQuestion:",), (" 7",), ("b 7.",), (".\nQ",), ("ion:",), ("ab",),
                (" L",), ("ion:", "b 7")]:
    want = first_stop(tok, looped, stops)
    got = generation.generate(model, tok, [prompt], budget, stop=stops, details=True)[0]
    assert (got.num_tokens, got.stopped) == ((want, True) if want else (budget, False)), \
        (stops, got, want)
  got = generation.generate(model, tok, [prompt, "zz"], budget, stop=("\nQuestion:",),
                        details=True)
  assert got == [generation.Completion("Lab 7.", len(chain), True)] * 2
  # A stop on the last allowed token counts as stopped; one token less is truncated.
  assert generation.generate(model, tok, [prompt], len(chain), stop=("\nQuestion:",),
                         details=True)[0].stopped
  cut = generation.generate(model, tok, [prompt], len(chain) - 1, stop=("\nQuestion:",),
                        details=True)[0]
  assert cut == generation.Completion(tok.decode(chain[:-1]), len(chain) - 1, False)
  assert generation.generate(model, tok, [prompt], budget, stop=("zz",), details=True)[0] == \
      generation.Completion(tok.decode(looped), budget, False)


def test_details_count_eos_as_stopped(tmp_path):
  tok = hf_tiny.tokenizer("sp")
  chain = tok.encode("Lab 7.", add_special_tokens=False)
  model, _ = load_hf(rigged("sp", os.fspath(tmp_path / "eos"), chain, after=tok.eos_token_id))
  assert generation.generate(model, tok, ["xyz"], 16, stop=("\n",), details=True) == \
      [generation.Completion("Lab 7.", len(chain) + 1, True)]
  assert generation.generate(model, tok, ["xyz"], 16, stop=("\n",)) == ["Lab 7."]
