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
    # Gemma 2: alternating local/global layers, both soft-caps low enough to bite,
    # query_pre_attn_scalar != head_dim, tied embeddings (the Gemma default).
    "gemma2": (transformers.Gemma2Config, dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0)),
    # Gemma 3 (text): 5 local layers then 1 global, q/k norms, local RoPE base 10k, global
    # 1M with linear scaling.
    "gemma3": (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        sliding_window=4, query_pre_attn_scalar=24,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}


def make_tiny(kind: str, out_dir: str, seed: int = 0, dtype=torch.float32, **overrides) -> str:
  """Builds a random tiny HF model of `kind`, with every weight (biases and norms included)
  randomised so a mis-loaded tensor changes the logits, and saves it to `out_dir`."""
  cls, kwargs = TINY[kind]
  kwargs = {**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0), **kwargs}
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


SP_VOCAB = 640  # Llama-2-style SentencePiece fixture: 3 specials, 256 byte pieces, merges.
TOKENIZERS = ("byte", "sp")  # Parametrise tokenizer-touching tests over both.


def _sp_corpus() -> list[str]:
  """English lines of the bundled GSM8K and MultiNLI (no newlines, like Llama-2's corpus: so
  '\\n' is the byte piece <0x0A>, and Thai/Chinese fall back to bytes as on Llama-2)."""
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1] / "data"
  lines = []
  for path in sorted(root.glob("gsm8k/*.jsonl")) + sorted(root.glob("mnli/*.jsonl")):
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f):
        if i >= 200:
          break
        for value in json.loads(line).values():
          if isinstance(value, str):
            lines += [l for l in value.split("\n") if l.strip()]
  return lines


_SP_MODEL: list[bytes] = []


def sp_tokenizer(out_dir: str | None = None):
  """A Llama-2-style tokenizer made with the `sentencepiece` package: BPE, byte fallback, the
  legacy dummy prefix ('\\n\\n' encodes as ['▁', '<0x0A>', '<0x0A>']; a single '▁The' decodes
  to 'The'), split digits, ids 0 unk, 1 <s> (added as BOS), 2 </s>. Saved as tokenizer.model +
  a LlamaTokenizer config (legacy=True) and loaded through AutoTokenizer, as users' Llama-2
  folders are."""
  import io  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if not _SP_MODEL:  # Trained once per process (~1 s), deterministic.
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sp_corpus()), model_writer=buf, model_type="bpe",
        vocab_size=SP_VOCAB, byte_fallback=True, add_dummy_prefix=True, split_digits=True,
        character_coverage=1.0, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    _SP_MODEL.append(buf.getvalue())
  out_dir = out_dir or tempfile.mkdtemp(prefix="sp_tok_")
  with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
    f.write(_SP_MODEL[0])
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
               "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
               "model_max_length": 4096}, f)
  return transformers.AutoTokenizer.from_pretrained(out_dir)


def tokenizer(kind: str, out_dir: str | None = None):
  """The fixture tokenizer `kind` ('byte' or 'sp'), saved into `out_dir` when given."""
  if kind == "byte":
    return byte_tokenizer(out_dir)
  if kind == "sp":
    return sp_tokenizer(out_dir)
  raise ValueError(f"tokenizer kind {kind!r}; use one of {TOKENIZERS}")


def vocab_size(kind: str) -> int:
  """The tiny model vocab that fits tokenizer `kind`."""
  return SP_VOCAB if kind == "sp" else VOCAB
