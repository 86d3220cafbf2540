"""Tiny random Hugging Face models (saved with save_pretrained) as ground truth for parity."""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

VOCAB = 256

# name -> (config class, kwargs). Each exercises one feature of the decoder family.
TINY = {
    "llama_gqa": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_head_dim_tied": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True)),
    "llama_bias": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "llama3_rope": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "mistral_window": (transformers.MistralConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2)),
}


def make_tiny(kind: str, out_dir: str, seed: int = 0, dtype=torch.float32, **overrides) -> str:
  """Builds a random tiny HF model of `kind`, with every weight (biases and norms included)
  randomised so a mis-loaded tensor changes the logits, and saves it to `out_dir`."""
  cls, kwargs = TINY[kind]
  kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, **kwargs)
  kwargs.update(overrides)
  config = cls(**kwargs)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  model = model.to(dtype)
  model.save_pretrained(out_dir)
  return out_dir


def hf_logits(folder: str, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
              ) -> np.ndarray:
  """float32 logits from transformers, positions counted over real tokens (as ours)."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager")
  model.eval()
  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
  if attention_mask is None:
    attention_mask = np.ones_like(input_ids)
  mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
  return out.logits.float().numpy()


def random_batch(rng: np.random.Generator, lengths, pad_left: bool):
  """Token ids [B, max(lengths)] padded with 0 and the matching attention mask."""
  width = max(lengths)
  ids = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros((len(lengths), width), np.int32)
  for row, n in enumerate(lengths):
    toks = rng.integers(3, VOCAB, size=n)
    sl = slice(width - n, width) if pad_left else slice(0, n)
    ids[row, sl] = toks
    mask[row, sl] = 1
  return ids, mask


def tmp_model(tmp_path_factory, kind: str, **kw) -> str:
  return make_tiny(kind, os.fspath(tmp_path_factory.mktemp(kind)), **kw)


def byte_tokenizer(out_dir: str | None = None):
  """A real HF fast tokenizer whose 256 tokens are the bytes (fits the tiny vocab): id 0 pad,
  1 bos, 2 eos, 3 unk are the bytes 0-3, which never occur in normal text (without an unk
  token transformers would add one as id 256, outside the vocabulary)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers
  from stt_jax.models.gguf_convert import bytes_to_unicode  # pylint: disable=g-import-not-at-top
  table = bytes_to_unicode()
  byte_to_unicode = [table[b] for b in range(256)]
  vocab = {ch: i for i, ch in enumerate(byte_to_unicode)}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=byte_to_unicode[0], bos_token=byte_to_unicode[1],
      eos_token=byte_to_unicode[2], unk_token=byte_to_unicode[3])
  if out_dir:
    fast.save_pretrained(out_dir)
  return fast
