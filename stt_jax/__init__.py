"""stt_jax: Self-Translate-Train (Ri, Kiyono, Takase 2024) in JAX/Flax NNX."""

__version__ = "0.1.0"
