"""Converts a Qwen2 or Gemma 3 GGUF file into a Hugging Face folder, with numpy only (no torch).

The demo model reaches us only as a quantized GGUF. transformers can load that, but its
route needs torch and holds the whole model in memory; this one dequantizes with the
`gguf` package's numpy kernels a slab of rows at a time and streams bf16 safetensors to
disk, so peak memory stays near one slab plus the memory-mapped GGUF.

Layout notes, checked numerically against transformers' GGUF loader:
  * GGUF lists dims fastest-first (`ne`); `GGUFReader` already hands back numpy order,
    which for 2-D weights is HF's (out_features, in_features). No transposes are needed.
  * llama.cpp permutes q/k rows only for the `llama` architecture (for its rotary
    layout); for `qwen2` and `gemma3` the rows are stored as HF has them, so no un-permute.
  * Gemma's RMSNorm scales by (1 + w). llama.cpp's converter stores (1 + w) so that its
    runtime multiplies by the stored value; every `*norm.weight` of a gemma3 GGUF (q/k norms
    included) is therefore converted back as stored - 1, in float32, as transformers' GGUF
    loader does (its Gemma2TensorProcessor). tests/test_gemma3_real.py checks it on the
    real 270M: with it, our folder's logits equal transformers' GGUF route.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from stt_jax import appendlog

# Tensor names inside one block: GGUF suffix -> HF suffix, per GGUF architecture.
_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GEMMA3_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_ARCH_BLOCK_NAMES = {"qwen2": _BLOCK_NAMES, "gemma3": _GEMMA3_BLOCK_NAMES}
SUPPORTED_ARCHITECTURES = tuple(_ARCH_BLOCK_NAMES)
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# safetensors dtype tags for what we can write.
_ST_DTYPES = {"bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)),
              "float32": ("F32", np.dtype(np.float32)),
              "float16": ("F16", np.dtype(np.float16))}

# Elements dequantized at once: bounds the f32 scratch to ~64 MiB whatever the tensor.
_CHUNK_ELEMENTS = 16 * 1024 * 1024


class ConversionError(ValueError):
  """A GGUF file that cannot be turned into an HF folder; the message says why."""


def hf_tensor_name(gguf_name: str, arch: str = "qwen2") -> str | None:
  """HF name for a GGUF tensor name of `arch`, or None if it has no HF counterpart."""
  if gguf_name in _TOP_NAMES:
    return _TOP_NAMES[gguf_name]
  block = _ARCH_BLOCK_NAMES[arch]
  m = _BLOCK_RE.match(gguf_name)
  if m and m.group(2) in block:
    return f"model.layers.{int(m.group(1))}.{block[m.group(2)]}"
  return None


def expected_hf_names(num_layers: int, tied: bool, arch: str = "qwen2") -> set[str]:
  """Every tensor an HF checkpoint of `arch` (Qwen2/Gemma3ForCausalLM) must hold."""
  names = {"model.embed_tokens.weight", "model.norm.weight"}
  if not tied:
    names.add("lm_head.weight")
  for i in range(num_layers):
    names.update(f"model.layers.{i}.{v}" for v in _ARCH_BLOCK_NAMES[arch].values())
  return names


def norm_offset(gguf_name: str, arch: str) -> float:
  """What to subtract from a stored tensor: 1 for Gemma's (1 + w) norm weights, else 0."""
  return 1.0 if arch == "gemma3" and gguf_name.endswith("norm.weight") else 0.0


def _hf_sort_key(name: str) -> tuple:
  """Embedding first, then layers in numeric order, then final norm and head."""
  m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
  if m:
    return (1, int(m.group(1)), m.group(2))
  return (0 if "embed_tokens" in name else 2, 0, name)


class TensorInfo(NamedTuple):
  """Where one tensor's bytes are and how to decode them."""
  name: str
  ggml_type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # numpy order (GGUF `ne` reversed)
  offset: int  # absolute, in bytes from the start of the file
  n_bytes: int


class GGUFFile(NamedTuple):
  """A parsed GGUF: metadata values and the tensor table, without the reader behind it.

  `GGUFReader` keeps ~0.5 GB of small numpy arrays alive for this model's token list,
  so we copy out what we need and drop it before converting; tensor bytes are then
  read slab by slab with plain file reads (no mmap pages counted in RSS either).
  """
  path: str
  fields: dict[str, Any]
  tensors: tuple[TensorInfo, ...]


def open_gguf(path: str | os.PathLike) -> GGUFFile:
  """Parses a GGUF with `GGUFReader`, turning a truncated/corrupt file into one clear error."""
  import gguf  # pylint: disable=import-outside-toplevel

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such GGUF file")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ConversionError(
        f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'); re-fetch it")
  try:
    reader = gguf.GGUFReader(path, "r")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = tuple(TensorInfo(t.name, t.tensor_type,
                               tuple(int(d) for d in reversed(t.shape.tolist())),
                               int(t.data_offset), int(t.n_bytes)) for t in reader.tensors)
  except Exception as e:  # The reader fails in many shapes on a cut-off file.
    raise ConversionError(
        f"{path}: corrupt or truncated GGUF ({size:,} bytes; reader said: "
        f"{type(e).__name__}: {' '.join(str(e).split())}); re-fetch it") from e
  del reader
  for t in tensors:
    if t.offset + t.n_bytes > size:
      raise ConversionError(
          f"{path}: truncated GGUF: tensor {t.name!r} ends at byte {t.offset + t.n_bytes:,} but "
          f"the file has {size:,}; re-fetch it")
  return GGUFFile(path, fields, tensors)


def _field(gf: GGUFFile, key: str, default: Any = None, required: bool = False) -> Any:
  """One metadata value (scalar, string or list); `default` if absent."""
  if key not in gf.fields:
    if required:
      raise ConversionError(f"{gf.path}: GGUF metadata lacks {key!r}")
    return default
  return gf.fields[key]


def _f32_literal(x: float) -> float:
  """The shortest decimal that round-trips the float32 value (9.99999997e-07 -> 1e-06)."""
  return float(str(np.float32(x)))


def _tensor_shapes(gf: GGUFFile) -> dict[str, tuple[int, ...]]:
  """GGUF tensor name -> numpy-order shape."""
  return {t.name: t.shape for t in gf.tensors}


def architecture(gf: GGUFFile) -> str:
  """The GGUF's `general.architecture`, if this converter maps it."""
  arch = _field(gf, "general.architecture", required=True)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ConversionError(f"{gf.path}: GGUF architecture is {arch!r}; this converter maps only "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  return arch


def hf_config(gf: GGUFFile, dtype: str = "bfloat16") -> dict:
  """HF `config.json` for the GGUF's architecture."""
  return {"qwen2": qwen2_config, "gemma3": gemma3_config}[architecture(gf)](gf, dtype)


def _special_ids(gf: GGUFFile) -> dict:
  """bos/eos/pad ids from the tokenizer metadata (None where absent)."""
  out = {}
  for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
    value = _field(gf, f"tokenizer.ggml.{key}")
    out[f"{name}_token_id"] = None if value is None else int(value)
  return out


def _gemma3_query_scalar(layers: int, hidden: int, heads: int, head_dim: int) -> int:
  """Gemma 3's query_pre_attn_scalar, which GGUF does not store.

  It is head_dim for every size but the 27B (62 layers), which scales by hidden / heads;
  llama.cpp hard-codes the same rule when it runs these files.
  """
  return hidden // heads if layers == 62 else head_dim


def gemma3_config(gf: GGUFFile, dtype: str = "bfloat16") -> dict:
  """HF `config.json` for Gemma3ForCausalLM (text-only, model_type gemma3_text).

  GGUF stores the global RoPE base and the window but not the layer pattern (every 6th
  layer global) nor the local base (10k): those are Gemma 3 constants, as in llama.cpp.
  """
  pre = "gemma3."
  scaling = _field(gf, pre + "rope.scaling.type")
  if scaling not in (None, "none"):
    raise ConversionError(f"{gf.path}: GGUF uses RoPE scaling {scaling!r} ({pre}rope.scaling.type),"
                          " which this converter does not map; only unscaled Gemma 3 (270M/1B)")
  shapes = _tensor_shapes(gf)
  if "token_embd.weight" not in shapes:
    raise ConversionError(f"{gf.path}: GGUF has no token_embd.weight tensor")
  vocab_size, hidden = (int(d) for d in shapes["token_embd.weight"])
  layers = int(_field(gf, pre + "block_count", required=True))
  heads = int(_field(gf, pre + "attention.head_count", required=True))
  kv_heads = int(_field(gf, pre + "attention.head_count_kv", heads))
  head_dim = int(_field(gf, pre + "attention.key_length", 256))
  if int(_field(gf, pre + "attention.value_length", head_dim)) != head_dim:
    raise ConversionError(f"{gf.path}: {pre}attention.value_length differs from key_length; "
                          "HF Gemma 3 needs them equal")
  window = int(_field(gf, pre + "attention.sliding_window", required=True))
  theta = float(_field(gf, pre + "rope.freq_base", 1_000_000.0))
  local_theta = float(_field(gf, pre + "rope.freq_base_swa", 10_000.0))
  return {
      "architectures": ["Gemma3ForCausalLM"],
      "model_type": "gemma3_text",
      "vocab_size": vocab_size,
      "hidden_size": hidden,
      "intermediate_size": int(_field(gf, pre + "feed_forward_length", required=True)),
      "num_hidden_layers": layers,
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "hidden_activation": "gelu_pytorch_tanh",
      "hidden_act": "gelu_pytorch_tanh",
      "max_position_embeddings": int(_field(gf, pre + "context_length", 32768)),
      "rms_norm_eps": _f32_literal(_field(gf, pre + "attention.layer_norm_rms_epsilon", 1e-6)),
      "rope_parameters": {
          "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
          "full_attention": {"rope_type": "default", "rope_theta": theta}},
      "sliding_window": window,
      "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                      for i in range(layers)],
      "query_pre_attn_scalar": _gemma3_query_scalar(layers, hidden, heads, head_dim),
      "attn_logit_softcapping": None,
      "final_logit_softcapping": None,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_bidirectional_attention": False,
      "initializer_range": 0.02,
      "use_cache": True,
      "tie_word_embeddings": "output.weight" not in shapes,
      **_special_ids(gf),
      "torch_dtype": dtype,
      "dtype": dtype,
  }


def qwen2_config(gf: GGUFFile, dtype: str = "bfloat16") -> dict:
  """HF `config.json` for Qwen2ForCausalLM, from GGUF metadata and tensor shapes."""
  arch = _field(gf, "general.architecture", required=True)
  if arch != "qwen2":
    raise ConversionError(f"GGUF architecture is {arch!r}; only 'qwen2' is supported")
  scaling = _field(gf, "qwen2.rope.scaling.type")
  if scaling not in (None, "none"):
    raise ConversionError(f"GGUF uses RoPE scaling {scaling!r}, which this converter does not map")
  shapes = _tensor_shapes(gf)
  if "token_embd.weight" not in shapes:
    raise ConversionError("GGUF has no token_embd.weight tensor")
  vocab_size, hidden = shapes["token_embd.weight"]
  layers = int(_field(gf, "qwen2.block_count", required=True))
  heads = int(_field(gf, "qwen2.attention.head_count", required=True))
  kv_heads = int(_field(gf, "qwen2.attention.head_count_kv", heads))
  emb_len = int(_field(gf, "qwen2.embedding_length", hidden))
  if emb_len != hidden:
    raise ConversionError(f"qwen2.embedding_length={emb_len} but token_embd has width {hidden}")
  theta = float(_field(gf, "qwen2.rope.freq_base", 10000.0))
  ctx = int(_field(gf, "qwen2.context_length", 32768))
  bos = _field(gf, "tokenizer.ggml.bos_token_id")
  eos = _field(gf, "tokenizer.ggml.eos_token_id")
  pad = _field(gf, "tokenizer.ggml.padding_token_id")
  return {
      "architectures": ["Qwen2ForCausalLM"],
      "model_type": "qwen2",
      "vocab_size": int(vocab_size),
      "hidden_size": int(hidden),
      "intermediate_size": int(_field(gf, "qwen2.feed_forward_length", required=True)),
      "num_hidden_layers": layers,
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": int(hidden) // heads,
      "hidden_act": "silu",
      "max_position_embeddings": ctx,
      "rms_norm_eps": _f32_literal(_field(gf, "qwen2.attention.layer_norm_rms_epsilon", 1e-6)),
      # Both spellings: transformers 5 reads rope_parameters, older readers rope_theta.
      "rope_theta": theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": theta},
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": layers,
      # The file stores a separate (differently quantized) head when `output` exists.
      "tie_word_embeddings": "output.weight" not in shapes,
      "bos_token_id": None if bos is None else int(bos),
      "eos_token_id": None if eos is None else int(eos),
      "pad_token_id": None if pad is None else int(pad),
      "torch_dtype": dtype,
      "dtype": dtype,
  }


_END_OF_TURN = {"qwen2": ("<|endoftext|>",), "gemma3": ("<end_of_turn>",)}


def generation_config(config: dict, gf: GGUFFile | None = None) -> dict:
  """Greedy-by-default generation config; stops at eos and the family's end-of-turn token.

  The upstream instruct repo samples by default; this project wants reproducible decodes,
  so sampling knobs are left out and callers opt in.
  """
  eos = [config["eos_token_id"]] if config.get("eos_token_id") is not None else []
  if gf is not None:  # Qwen's <|endoftext|> and Gemma's <end_of_turn> also end a turn.
    tokens = _field(gf, "tokenizer.ggml.tokens", [])
    for name in _END_OF_TURN.get(_field(gf, "general.architecture"), ()):
      if name in tokens and tokens.index(name) not in eos:
        eos.append(tokens.index(name))
  out = {"bos_token_id": config.get("bos_token_id"),
         "eos_token_id": eos[0] if len(eos) == 1 else eos,
         "pad_token_id": config.get("pad_token_id"),
         "do_sample": False}
  return {k: v for k, v in out.items() if v is not None and v != []}


class _Entry:
  """One tensor to write: header facts now, bytes later (so RAM holds one slab)."""

  def __init__(self, hf_name: str, shape: tuple[int, ...],
               chunks: Callable[[], Iterator[np.ndarray]]):
    self.hf_name, self.shape, self.chunks = hf_name, shape, chunks


def _dequant_chunks(path: str, t: TensorInfo, out_dtype: np.dtype,
                    offset: float = 0.0) -> Iterator[np.ndarray]:
  """Yields the tensor (minus `offset`, in f32) as row slabs in `out_dtype`, read lazily."""
  from gguf import quants  # pylint: disable=import-outside-toplevel

  cols = t.shape[-1] if t.shape else 1
  rows = int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1
  row_bytes = t.n_bytes // rows
  if row_bytes * rows != t.n_bytes:
    raise ConversionError(
        f"{path}: tensor {t.name!r}: {t.n_bytes} bytes do not split into {rows} rows")
  step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
  with open(path, "rb") as f:
    f.seek(t.offset)
    for start in range(0, rows, step):
      n = min(step, rows - start)
      raw = f.read(n * row_bytes)
      if len(raw) != n * row_bytes:
        raise ConversionError(
            f"{path}: truncated GGUF while reading tensor {t.name!r}; re-fetch it")
      block = quants.dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(n, row_bytes),
                                t.ggml_type)
      block = np.asarray(block, dtype=np.float32).reshape(n, cols)
      if offset:
        block = block - np.float32(offset)
      yield np.ascontiguousarray(block.astype(out_dtype, copy=False))


def plan_tensors(gf: GGUFFile, out_dtype: np.dtype) -> list[_Entry]:
  """Maps every GGUF tensor to an HF entry; fails on unknown names or missing tensors."""
  arch = architecture(gf)
  layers = int(_field(gf, f"{arch}.block_count", required=True))
  shapes = _tensor_shapes(gf)
  entries, unknown = [], []
  for t in gf.tensors:
    name = hf_tensor_name(t.name, arch)
    if name is None:
      unknown.append(t.name)
      continue
    chunks = lambda t=t: _dequant_chunks(gf.path, t, out_dtype, norm_offset(t.name, arch))
    entries.append(_Entry(name, t.shape, chunks))
  if unknown:
    raise ConversionError(f"{gf.path}: GGUF has tensors with no HF {arch} name: {unknown[:5]}")
  have = {e.hf_name for e in entries}
  missing = expected_hf_names(layers, "output.weight" not in shapes, arch) - have
  if missing:
    raise ConversionError(
        f"{gf.path}: GGUF lacks tensors for {sorted(missing)[:5]} ({len(missing)} missing)")
  entries.sort(key=lambda e: _hf_sort_key(e.hf_name))
  return entries


def write_safetensors(path: str | os.PathLike, entries: list[_Entry], dtype: str,
                      progress: Callable[[int], None] | None = None) -> int:
  """Streams entries into one safetensors file; returns bytes written.

  Written by hand because `safetensors.numpy` needs whole arrays in memory and does not
  take ml_dtypes bfloat16. Format: u64-LE header length, JSON header (space-padded to
  8 bytes), then the raw little-endian tensor bytes in header order.
  """
  tag, np_dtype = _ST_DTYPES[dtype]
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for e in entries:
    nbytes = int(np.prod(e.shape, dtype=np.int64)) * np_dtype.itemsize
    header[e.hf_name] = {"dtype": tag, "shape": list(e.shape),
                         "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for e in entries:
      start = f.tell()
      for chunk in e.chunks():
        if chunk.dtype != np_dtype:
          chunk = chunk.astype(np_dtype)
        if sys.byteorder != "little":  # safetensors is little-endian by definition.
          chunk = chunk.byteswap()
        f.write(chunk.tobytes())
        if progress is not None:
          progress(chunk.nbytes)
      want = header[e.hf_name]["data_offsets"][1] - header[e.hf_name]["data_offsets"][0]
      if f.tell() - start != want:
        raise ConversionError(f"{e.hf_name}: wrote {f.tell() - start} bytes, expected {want}")
  return 8 + len(blob) + offset


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable-char table that byte-level BPE vocabularies are spelled in."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def build_tokenizer(gf: GGUFFile):
  """The transformers tokenizer the GGUF's vocab describes (Qwen2 BPE or Gemma SentencePiece)."""
  if _field(gf, "general.architecture") == "gemma3":
    return _gemma_tokenizer(gf)
  return _qwen2_tokenizer(gf)


def _add_gguf_added_tokens(tok, tokens: list[str], types: list[int], keep) -> None:
  """Control tokens (type 3) as special, user-defined ones (4) as plain added tokens.

  Both are matched whole in the text, as llama.cpp does; `keep(token)` filters either kind.
  """
  from tokenizers import AddedToken  # pylint: disable=import-outside-toplevel

  control = [AddedToken(t, normalized=False, special=True)
             for t, ty in zip(tokens, types) if ty == 3 and keep(t)]
  user = [AddedToken(t, normalized=False, special=False)
          for t, ty in zip(tokens, types) if ty == 4 and keep(t)]
  if control:
    tok.add_tokens(control, special_tokens=True)
  if user:
    tok.add_tokens(user)


def _gemma_tokenizer(gf: GGUFFile):
  """transformers `GemmaTokenizer` (BPE, byte fallback, spaces as U+2581) from the GGUF vocab.

  The file has tokens, scores and types but no merges. The merges are the vocabulary cut
  into pairs of tokens, ranked by the token's position in the file (Gemma's scores do not
  follow merge order); this is also what transformers' `gguf_file=` route does, which
  imports torch. Runs of spaces are stored as real spaces, so they are respelled with
  U+2581, the spelling the normalizer produces. No dummy prefix: Gemma 3 sets
  add_space_prefix false, and a file that says otherwise is refused.
  """
  # pylint: disable=import-outside-toplevel
  from transformers import GemmaTokenizer
  from transformers.tokenization_utils_base import generate_merges
  # pylint: enable=import-outside-toplevel

  model = _field(gf, "tokenizer.ggml.model")
  if model != "llama":
    raise ConversionError(f"{gf.path}: GGUF tokenizer model is {model!r}; expected SentencePiece "
                          "'llama' for gemma3")
  if _field(gf, "tokenizer.ggml.add_space_prefix", False):
    raise ConversionError(f"{gf.path}: tokenizer.ggml.add_space_prefix is true; Gemma 3 adds no "
                          "dummy prefix and this converter does not map one")
  raw = _field(gf, "tokenizer.ggml.tokens", required=True)
  tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in raw]
  types = _field(gf, "tokenizer.ggml.token_type", [1] * len(tokens))
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ConversionError(f"{gf.path}: GGUF vocabulary spells {len(tokens) - len(vocab)} tokens "
                          "twice; it is not a Gemma SentencePiece vocabulary")
  merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})

  def token(key, default):
    idx = _field(gf, f"tokenizer.ggml.{key}")
    return default if idx is None else tokens[int(idx)]

  tok = GemmaTokenizer(
      vocab=vocab, merges=merges, bos_token=token("bos_token_id", "<bos>"),
      eos_token=token("eos_token_id", "<eos>"), pad_token=token("padding_token_id", "<pad>"),
      unk_token=token("unknown_token_id", "<unk>"),
      add_bos_token=bool(_field(gf, "tokenizer.ggml.add_bos_token", True)),
      add_eos_token=bool(_field(gf, "tokenizer.ggml.add_eos_token", False)),
      **({"chat_template": _field(gf, "tokenizer.chat_template")}
         if _field(gf, "tokenizer.chat_template") else {}))
  _add_gguf_added_tokens(tok, tokens, types, keep=lambda t: True)
  return tok


def _qwen2_tokenizer(gf: GGUFFile):
  """transformers `Qwen2Tokenizer` from the GGUF's vocab/merges, without torch.

  transformers' own `gguf_file=` tokenizer route imports torch (its GGUF reader does), so
  we redo its few steps: vocab + merges into Qwen2Tokenizer (which adds Qwen2's split regex
  and NFC normalizer, as in the upstream tokenizer.json), control tokens as special,
  user-defined ones as plain added tokens.
  """
  from transformers import Qwen2Tokenizer  # pylint: disable=import-outside-toplevel

  model = _field(gf, "tokenizer.ggml.model")
  pre = _field(gf, "tokenizer.ggml.pre")
  if model != "gpt2":
    raise ConversionError(f"GGUF tokenizer model is {model!r}; expected byte-level BPE 'gpt2'")
  if pre not in (None, "qwen2"):
    raise ConversionError(f"GGUF pre-tokenizer is {pre!r}; only 'qwen2' is mapped")
  tokens = _field(gf, "tokenizer.ggml.tokens", required=True)
  types = _field(gf, "tokenizer.ggml.token_type", [1] * len(tokens))
  merges = _field(gf, "tokenizer.ggml.merges", required=True)
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {(tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))): i
           for i, tok in enumerate(tokens)}

  def token(key):
    idx = _field(gf, f"tokenizer.ggml.{key}")
    return None if idx is None else tokens[int(idx)]

  kwargs = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
            "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id")}
  chat_template = _field(gf, "tokenizer.chat_template")
  if chat_template:
    kwargs["chat_template"] = chat_template
  tok = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], **kwargs)
  # A control token outside the byte alphabet is a llama.cpp mislabel: skip it (and any
  # user-defined token the vocab does not spell as is).
  _add_gguf_added_tokens(tok, tokens, types,
                         keep=lambda t: set(t) <= alphabet and t in vocab)
  return tok


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bfloat16",
            with_tokenizer: bool = True, gguf_file: GGUFFile | None = None,
            progress: bool = True) -> dict:
  """Writes config.json, generation_config.json, model.safetensors (+ tokenizer) to out_dir.

  Returns a summary dict (tensor count, bytes). `dtype` is the stored weight dtype:
  bfloat16 (default; round-to-nearest-even from the f32 dequantized values) or float32.
  """
  if dtype not in _ST_DTYPES:
    raise ConversionError(f"dtype {dtype!r} not one of {sorted(_ST_DTYPES)}")
  gf = gguf_file if gguf_file is not None else open_gguf(gguf_path)
  os.makedirs(out_dir, exist_ok=True)
  config = hf_config(gf, dtype)
  entries = plan_tensors(gf, _ST_DTYPES[dtype][1])
  n_params = sum(int(np.prod(e.shape, dtype=np.int64)) for e in entries)
  total = n_params * _ST_DTYPES[dtype][1].itemsize
  bar = _progress_bar(total, f"convert -> {dtype} safetensors", progress)
  try:
    written = write_safetensors(os.path.join(out_dir, "model.safetensors"), entries, dtype,
                                bar.update if bar is not None else None)
  finally:
    if bar is not None:
      bar.close()
  appendlog.write_json(os.path.join(out_dir, "config.json"), config)
  appendlog.write_json(os.path.join(out_dir, "generation_config.json"),
                       generation_config(config, gf))
  if with_tokenizer:
    build_tokenizer(gf).save_pretrained(out_dir)
    if _field(gf, "general.architecture") == "gemma3":
      _record_bos_eos_flags(out_dir, gf)
  return {"tensors": len(entries), "parameters": n_params, "safetensors_bytes": written}


def _record_bos_eos_flags(out_dir: str | os.PathLike, gf: GGUFFile) -> None:
  """Writes add_bos_token/add_eos_token into tokenizer_config.json.

  tokenizer.json's post-processor already adds <bos>; saying so in the config as well keeps
  readers that only look there (and people) from guessing.
  """
  path = os.path.join(out_dir, "tokenizer_config.json")
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  cfg["add_bos_token"] = bool(_field(gf, "tokenizer.ggml.add_bos_token", True))
  cfg["add_eos_token"] = bool(_field(gf, "tokenizer.ggml.add_eos_token", False))
  appendlog.write_json(path, cfg)


def _progress_bar(total: int, desc: str, enabled: bool):
  """A tqdm byte bar on stderr, or None when disabled or tqdm is missing."""
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
              mininterval=0.5)
