"""ModelConfig: the architecture of one decoder, read from an HF config.json.

One frozen dataclass serves Llama 2/3/3.1, Mistral, Qwen2/2.5, Gemma 2 and Gemma 3 (text), so
the decoder has a single code path with switches: biases, tied embeddings, RoPE scaling, sliding
windows per layer, and Gemma's embedding scale, (1 + w) RMSNorm, sandwich norms, GeGLU, q/k
norms, query_pre_attn_scalar, logit soft-caps and a RoPE base per layer type. Both the pre-v5
transformers keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`,
`sliding_window_pattern`, `torch_dtype`) and the v5 keys (`rope_parameters`, per layer type for
Gemma 3, `layer_types`, `dtype`) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
}
GEMMA = ("gemma2", "gemma3_text")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
_GEMMA_DEFAULTS = {"head_dim": 256, "tie_word_embeddings": True, "sliding_window": 4096,
                   "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh"}
_DEFAULTS = {
    "gemma2": {**_GEMMA_DEFAULTS, "max_position_embeddings": 8192,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": {**_GEMMA_DEFAULTS, "max_position_embeddings": 131072,
                    "sliding_window_pattern": 6},
}
# Gemma 3's default RoPE bases (transformers): global (full-attention) and local layers.
_GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


class ConfigError(ValueError):
  """A config.json that we cannot (or must not) turn into a ModelConfig."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture fields of a decoder; names follow the HF config keys they come from."""

  architecture: str  # HF `architectures[0]`.
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # RoPE scaling as a sorted tuple of (key, value) pairs so the config stays hashable.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 always; Llama `attention_bias`.
  o_bias: bool = False  # Llama `attention_bias` only.
  mlp_bias: bool = False  # Llama `mlp_bias`.
  # Per-layer sliding window (None = full attention), from Mistral `sliding_window` or Qwen2
  # `layer_types`; a tuple with one entry per layer.
  sliding_windows: tuple[int | None, ...] | None = None
  # Gemma switches (the defaults are Llama's).
  hidden_act: str = "silu"  # MLP gate activation: silu | gelu_pytorch_tanh (GeGLU).
  embed_scale: bool = False  # Embeddings times sqrt(hidden_size).
  norm_unit_offset: bool = False  # RMSNorm scales by (1 + w), in float32.
  sandwich_norms: bool = False  # Norms after attention and around the MLP (Gemma 2/3).
  qk_norm: bool = False  # RMSNorm over head_dim of queries and keys before RoPE (Gemma 3).
  query_pre_attn_scalar: float | None = None  # Scores scale by this ** -0.5 (None: head_dim).
  attn_logit_softcapping: float | None = None  # cap * tanh(scores / cap) (Gemma 2).
  final_logit_softcapping: float | None = None  # cap * tanh(logits / cap).
  # RoPE base of sliding-window layers when it differs from the global one (Gemma 3's local
  # 10k vs 1M); those layers take no rope_scaling (transformers scales full attention only).
  local_rope_theta: float | None = None
  checkpoint_dtype: str | None = None  # `torch_dtype` / `dtype` of the stored weights.
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # The original config.json, kept to write it back on export; excluded from hash/eq.
  hf_config: dict | None = dataclasses.field(
      default=None, compare=False, hash=False, repr=False)
  # The folder the weights came from (tokenizer files are copied from it on export).
  source_dir: str | None = dataclasses.field(default=None, compare=False, hash=False)

  @property
  def model_type(self) -> str:
    return SUPPORTED_ARCHITECTURES[self.architecture]

  @property
  def rope_type(self) -> str:
    return dict(self.rope_scaling or ()).get("rope_type", "default")

  def sliding_window(self, layer: int) -> int | None:
    return self.sliding_windows[layer] if self.sliding_windows else None

  @property
  def attn_scale(self) -> float:
    """The attention scores' scale: query_pre_attn_scalar ** -0.5 (Gemma), else head_dim's."""
    return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def rope_index(self, layer: int) -> int:
    """Which of `rope_tables()` layer `layer` uses (1: a sliding layer's local base)."""
    return int(self.local_rope_theta is not None and self.sliding_window(layer) is not None)

  def rope_tables(self) -> tuple[np.ndarray, ...]:
    """Inverse frequencies per RoPE variant: (global,) or (global, local)."""
    tables = (self.inv_freq(),)
    if self.local_rope_theta is not None:
      tables += (_inv_freq(self.local_rope_theta, self.head_dim, None),)
    return tables

  def inv_freq(self) -> np.ndarray:
    """Global RoPE inverse frequencies [head_dim // 2], float32, scaled if configured."""
    return _inv_freq(self.rope_theta, self.head_dim, self.rope_scaling)

  def num_params(self) -> int:
    """Parameter count (for memory/FLOP estimates)."""
    h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
    q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
    attn = h * (q + 2 * kv) + q * h
    attn += (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * d * self.qk_norm
    mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
    layer = attn + mlp + (4 if self.sandwich_norms else 2) * h
    emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
    return self.num_hidden_layers * layer + emb + h

  # ---------------------------------------------------------------- HF round trip

  @classmethod
  def from_hf_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
    """Validates an HF config dict; every failure is one line naming the key and the fix."""
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch is None:
      by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
      arch = by_type.get(raw.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
      raise ConfigError(
          f"{source}: unsupported architecture {archs or raw.get('model_type')!r} (key "
          f"'architectures'); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    model_type = SUPPORTED_ARCHITECTURES[arch]
    hf_config = dict(raw)
    # transformers' class defaults, which save_pretrained leaves out of config.json.
    raw = {**_DEFAULTS.get(model_type, {}), **raw}

    def need(key):
      if key not in raw or raw[key] is None:
        raise ConfigError(f"{source}: missing required key {key!r} for {arch}")
      return raw[key]

    gemma = model_type in GEMMA
    act_key = "hidden_activation" if gemma and raw.get("hidden_activation") else "hidden_act"
    act = raw.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
    if act not in SUPPORTED_ACTIVATIONS:
      raise ConfigError(f"{source}: unsupported {act_key} {act!r}; supported: "
                        f"{', '.join(SUPPORTED_ACTIVATIONS)}")
    if gemma and raw.get("use_bidirectional_attention"):
      raise ConfigError(f"{source}: use_bidirectional_attention=true (an encoder) is not a "
                        "causal LM; set it to false or use a causal checkpoint")
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
      raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of "
                        f"num_key_value_heads={kv_heads}")
    head_dim = int(raw.get("head_dim") or hidden // heads)
    layers = int(need("num_hidden_layers"))

    rope_theta, rope_scaling, local_theta = _read_layer_ropes(raw, model_type, source)
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported")

    attention_bias = bool(raw.get("attention_bias", False))
    qkv_bias = True if model_type == "qwen2" else attention_bias
    o_bias = attention_bias if model_type in ("llama",) + GEMMA else False
    mlp_bias = bool(raw.get("mlp_bias", False)) if model_type == "llama" else False

    sliding = _read_sliding_windows(raw, model_type, layers, source)
    if sliding is None:
      local_theta = None
    eos = raw.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return cls(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        sliding_windows=sliding,
        hidden_act=act,
        embed_scale=gemma,
        norm_unit_offset=gemma,
        sandwich_norms=gemma,
        qk_norm=model_type == "gemma3_text",
        query_pre_attn_scalar=(float(raw.get("query_pre_attn_scalar") or 256) if gemma
                               else None),
        # transformers' Gemma 3 ignores attn_logit_softcapping; Gemma 2 applies it.
        attn_logit_softcapping=_cap(raw, "attn_logit_softcapping", source)
        if model_type == "gemma2" else None,
        final_logit_softcapping=_cap(raw, "final_logit_softcapping", source) if gemma else None,
        local_rope_theta=local_theta,
        checkpoint_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id"),
        hf_config=hf_config,
    )

  @classmethod
  def from_hf(cls, path: str | os.PathLike) -> ModelConfig:
    """Reads `<path>/config.json` (or a config.json path)."""
    path = os.fspath(path)
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(file):
      raise ConfigError(f"{file}: not found; pass a local Hugging Face model folder "
                        "(config.json + *.safetensors)")
    try:
      with open(file, encoding="utf-8") as f:
        raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{file}: not valid JSON ({e}); re-download or re-export the model") from e
    return cls.from_hf_dict(raw, source=file)

  def to_hf_dict(self, dtype: str | None = None) -> dict:
    """An HF config dict that transformers reads back into the same architecture."""
    out = dict(self.hf_config or {})
    out.update({
        "architectures": [self.architecture],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        ("hidden_activation" if self.model_type in GEMMA else "hidden_act"): self.hidden_act,
    })
    if not self.hf_config:
      out["rope_parameters"] = self._hf_rope()
      if self.model_type in GEMMA:
        out.update(self._hf_gemma())
      if self.model_type in ("llama",) + GEMMA:
        out["attention_bias"] = self.qkv_bias
        out["mlp_bias"] = self.mlp_bias
      for key in ("bos_token_id", "pad_token_id"):
        if getattr(self, key) is not None:
          out[key] = getattr(self, key)
      if self.eos_token_id:
        out["eos_token_id"] = (list(self.eos_token_id) if len(self.eos_token_id) > 1
                               else self.eos_token_id[0])
    if dtype is not None:
      out["dtype"] = dtype
      out.pop("torch_dtype", None)
    return out

  def _hf_rope(self) -> dict:
    """`rope_parameters` (v5 form): one dict, or one per layer type with a local base."""
    full = {"rope_type": "default", "rope_theta": self.rope_theta, **dict(self.rope_scaling or ())}
    if self.model_type != "gemma3_text":
      return full
    local = self.local_rope_theta or self.rope_theta
    return {"full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local}}

  def _hf_gemma(self) -> dict:
    """The Gemma keys of a config built without an HF dict (the switches are implied)."""
    windows = [self.sliding_window(i) for i in range(self.num_hidden_layers)]
    used = {w for w in windows if w}
    scalar = self.query_pre_attn_scalar or self.head_dim
    return {"query_pre_attn_scalar": int(scalar) if float(scalar).is_integer() else scalar,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "sliding_window": max(used) if used else None,
            "layer_types": ["sliding_attention" if w else "full_attention" for w in windows]}


def _read_rope(raw: dict, source: str, key: str = "rope_parameters"
               ) -> tuple[float, tuple | None]:
  """Returns (theta, scaling) from either `rope_parameters` (v5) or `rope_theta`/`rope_scaling`."""
  params = raw.get("rope_parameters")
  if params is None:
    params = dict(raw.get("rope_scaling") or {})
    key = "rope_scaling"
    if "rope_theta" in raw:
      params.setdefault("rope_theta", raw["rope_theta"])
  params = dict(params)
  if "type" in params and "rope_type" not in params:  # Oldest form: {"type": "linear", ...}.
    params["rope_type"] = params.pop("type")
  theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", "default")
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ConfigError(f"{source}: unsupported rope type {rope_type!r} (key '{key}.rope_type'); "
                      f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
  if rope_type == "default":
    return theta, None
  required = ("factor",)
  if rope_type == "llama3":
    required += ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [k for k in required if k not in params]
  if missing:
    raise ConfigError(f"{source}: rope type {rope_type!r} needs {key}.{missing[0]}")
  return theta, tuple(sorted((k, params[k]) for k in ("rope_type",) + required))


def _read_sliding_windows(raw: dict, model_type: str, layers: int, source: str):
  """Per-layer window sizes following transformers' rules for each family."""
  if model_type == "llama":
    return None
  window = raw.get("sliding_window")
  if model_type in GEMMA:
    return _gemma_windows(raw, model_type, layers, source)
  if model_type == "mistral":
    return (int(window),) * layers if window else None
  # Qwen2: windows only where `layer_types` says so (derived from use_sliding_window otherwise).
  if not raw.get("use_sliding_window") or not window:
    window = None
  types = raw.get("layer_types")
  if types is None:
    start = int(raw.get("max_window_layers", layers))
    types = ["sliding_attention" if window and i >= start else "full_attention"
             for i in range(layers)]
  if not window or "sliding_attention" not in types:
    return None
  return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _gemma_windows(raw: dict, model_type: str, layers: int, source: str):
  """Gemma: `layer_types`, else every other layer sliding (Gemma 2; first one sliding) or
  `sliding_window_pattern` - 1 sliding layers then one global (Gemma 3's 5:1)."""
  window = raw.get("sliding_window")
  types = raw.get("layer_types")
  if types is None:
    pattern = 2 if model_type == "gemma2" else int(raw["sliding_window_pattern"])
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
             for i in range(layers)]
  if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
    raise ConfigError(f"{source}: layer_types must list 'sliding_attention' or "
                      f"'full_attention' once per layer ({layers}); got {types!r}")
  if not window or "sliding_attention" not in types:
    return None
  return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _inv_freq(theta: float, dim: int, scaling: tuple | None) -> np.ndarray:
  """RoPE inverse frequencies [dim // 2], float32, with linear or llama3 scaling."""
  inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv = inv.astype(np.float32)
  params = dict(scaling or ())
  rope_type = params.get("rope_type", "default")
  if rope_type == "default":
    return inv
  factor = params["factor"]
  if rope_type == "linear":
    return (inv / factor).astype(np.float32)
  low, high = params["low_freq_factor"], params["high_freq_factor"]
  old_len = params["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _cap(raw: dict, key: str, source: str) -> float | None:
  """A soft-cap value: None/0 = off; anything else must be a positive number."""
  value = raw.get(key)
  if not value:
    return None
  if not isinstance(value, (int, float)) or value < 0:
    raise ConfigError(f"{source}: {key}={value!r} must be a positive number or null")
  return float(value)


def _read_layer_ropes(raw: dict, model_type: str, source: str
                      ) -> tuple[float, tuple | None, float | None]:
  """(global theta, global scaling, local theta or None). Gemma 3 has a base per layer type:
  v5 `rope_parameters` = {"full_attention": {...}, "sliding_attention": {...}}; pre-v5
  `rope_theta` (global), `rope_scaling` (global) and `rope_local_base_freq`."""
  if model_type != "gemma3_text":
    theta, scaling = _read_rope(raw, source)
    return theta, scaling, None
  params = raw.get("rope_parameters")
  if isinstance(params, dict) and set(params) & set(_GEMMA3_THETA):
    per_type = {}
    for kind, default in _GEMMA3_THETA.items():
      one = {"rope_theta": default, **dict(params.get(kind) or {})}
      per_type[kind] = _read_rope({"rope_parameters": one}, source,
                                  key=f"rope_parameters.{kind}")
    theta, scaling = per_type["full_attention"]
    local, local_scaling = per_type["sliding_attention"]
  else:
    theta, scaling = _read_rope(
        {**raw, "rope_theta": raw.get("rope_theta", _GEMMA3_THETA["full_attention"])}, source)
    local, local_scaling = float(raw.get("rope_local_base_freq",
                                         _GEMMA3_THETA["sliding_attention"])), None
  if local_scaling is not None:
    raise ConfigError(f"{source}: RoPE scaling on sliding-attention layers is not supported "
                      "(key 'rope_parameters.sliding_attention'); scale full_attention only")
  return theta, scaling, local
