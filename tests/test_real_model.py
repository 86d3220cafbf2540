"""Real 0.5B Qwen (slow): logits and greedy decoding agree with transformers on real text.

Needs the folder from `python -m stt_jax.models.fetch_demo` (skipped with a reason otherwise).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stt_jax import generation  # noqa: E402
from stt_jax.models import load_hf  # noqa: E402
from stt_jax.models.fetch_demo import default_cache_dir, is_complete  # noqa: E402

pytestmark = pytest.mark.slow
DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")


@pytest.fixture(scope="module")
def folder():
  path = os.fspath(default_cache_dir())
  if not is_complete(path):
    pytest.skip(f"{path} missing: run `python -m stt_jax.models.fetch_demo`")
  return path


@pytest.fixture(scope="module")
def models(folder):
  ours, config = load_hf(folder, dtype="float32")
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  return ours, hf, tok, config


def _first_row(path, key):
  with open(path, encoding="utf-8") as f:
    return json.loads(f.readline())[key]


@pytest.mark.parametrize("lang,text", [
    ("en", lambda: _first_row(os.path.join(DATA, "gsm8k", "test.jsonl"), "question")),
    ("zh", lambda: _first_row(os.path.join(DATA, "mgsm", "mgsm_zh.jsonl"), "question")),
])
def test_next_token_predictions_match(models, lang, text, record_property):
  ours, hf, tok, _ = models
  ids = tok.encode(text())[:64]
  assert len(ids) == 64, f"{lang} sentence has only {len(ids)} tokens"
  with torch.no_grad():
    expected = hf(torch.tensor([ids])).logits[0].float().numpy()
  got = np.asarray(ours(jnp.asarray([ids])))[0]
  diff = float(np.abs(got - expected).max())
  record_property(f"max_abs_logit_diff_{lang}", diff)
  print(f"\n{lang}: max abs logit diff over 64 positions = {diff:.2e}")
  assert (got.argmax(-1) == expected.argmax(-1)).all()
  assert diff < 5e-3


def test_few_shot_translation_token_identical(models):
  ours, hf, tok, config = models
  shots = [("The cat is sleeping on the sofa.", "猫在沙发上睡觉。"),
           ("I would like a cup of tea, please.", "请给我一杯茶。"),
           ("The train leaves at seven o'clock.", "火车七点出发。")]
  prefix = "".join(f"English: {en}\nChinese: {zh}\n\n" for en, zh in shots)
  sources = ["Janet has three apples and buys two more.", "Where is the nearest library?"]
  prompts = [f"{prefix}English: {s}\nChinese:" for s in sources]
  ids = [tok.encode(p) for p in prompts]
  got = generation.generate_tokens(ours, ids, max_new_tokens=32, eos_ids=(), batch_size=2)
  for p, g in zip(ids, got):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32,
                        do_sample=False, pad_token_id=tok.pad_token_id or 0)
    assert g == ref[0, len(p):].tolist()
  texts = generation.generate(ours, tok, prompts, max_new_tokens=32, stop=("\n",))
  print("\n" + "\n".join(texts))
  assert all(t.strip() and "\n" not in t for t in texts)
  assert any("\u4e00" <= ch <= "\u9fff" for ch in "".join(texts)), texts
