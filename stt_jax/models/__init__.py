"""Models: HF config -> ModelConfig, one NNX decoder family, HF folder load/save."""

from stt_jax.models.config import ConfigError, ModelConfig
from stt_jax.models.decoder import CausalLM, KVCache
from stt_jax.models.hf_io import LoadError, load_hf, save_hf

__all__ = ["CausalLM", "ConfigError", "KVCache", "LoadError", "ModelConfig", "load_hf", "save_hf"]
