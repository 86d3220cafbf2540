"""Shared helpers of the training tests (no tests here): a byte tokenizer, short MGSM-schema
rows, a small train config. Kept free of torch/transformers imports so that the subprocesses
of the resume test start quickly."""

from __future__ import annotations

import numpy as np

from stt_jax import run_config


class ByteTokenizer:
  """The HF tokenizer call API over UTF-8 bytes (fits hf_tiny.VOCAB = 256); 1 = BOS, 2 = EOS
  never occur in text. Same ids as hf_tiny.byte_tokenizer, plus a BOS on prompts."""

  eos_token_id = 2
  bos_token_id = 1
  pad_token_id = 0

  def __call__(self, texts, add_special_tokens=True):
    prefix = [self.bos_token_id] if add_special_tokens else []
    return {"input_ids": [prefix + list(t.encode("utf-8")) for t in texts]}


def math_rows(n: int, lang: str = "en", seed: int = 0) -> list[dict]:
  """Short rows in the MGSM training schema (question, rationale, answer_number)."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    a, b = (int(x) for x in rng.integers(1, 50, 2))
    rows.append({"id": f"{lang}-{i}", "lang": lang, "question": f"{a} plus {b}?",
                 "rationale": f"{a}+{b}={a + b}.\nThe answer is {a + b}.",
                 "answer_number": a + b})
  return rows


def small_config(**train_overrides):
  """A full run config: float32, full fine-tuning, 8 rows x 64 tokens, log every step,
  checkpoint every 2."""
  config = run_config.get_config()
  t = config.train
  t.method = "full"
  t.dtype = "float32"
  t.param_dtype = "float32"
  t.seq_len = 64
  t.batch_size = 8
  t.lr = 3e-3
  t.warmup_steps = 2
  t.steps = 8
  t.log_every = 1
  t.lora.dropout = 0.0
  config.checkpoint.every = 2
  config.checkpoint.keep = 3
  for key, value in train_overrides.items():
    node = t
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  run_config.validate(config)  # The library trusts its caller to have checked the config.
  return config


def read_metrics(path) -> list[dict]:
  import json  # pylint: disable=g-import-not-at-top
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
