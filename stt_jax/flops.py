"""Model FLOPs per trained token and per-device peak FLOP/s: the two halves of MFU.

Kept apart from the train loop so benchmarks and reports can price a step without building
a trainer.
"""

from __future__ import annotations

# Dense bf16 peak FLOP/s per device, matched as a substring of `device.device_kind` (longest
# match wins). TPU v2/v3 expose each core as a device. Override with train.peak_flops.
PEAK_FLOPS = {
    "TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12, "TPU7x": 2307e12, "A100": 312e12, "H100": 989e12, "H200": 989e12,
    "H800": 989e12, "B200": 2250e12, "GB200": 2500e12, "L4": 121e12,
}


def flops_per_token(config, seq_len: int, method: str) -> float:
  """Model FLOPs per trained token (the MFU numerator).

  Full: 6 * N + 12 * layers * q_dim * seq_len (forward 2N + backward 4N; attention scores and
  values, 2 * 2 * layers * q_dim * seq_len forward, times 3). LoRA skips the base weights'
  gradients: 4 * N + 8 * layers * q_dim * seq_len. N counts matmul weights: every parameter
  except an untied input embedding (a lookup) and the adapters themselves.
  """
  n = config.num_params()
  if not config.tie_word_embeddings:
    n -= config.vocab_size * config.hidden_size
  attn = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
  passes = 3 if method == "full" else 2
  return passes * (2 * n + attn)


def peak_flops(device_kind: str, configured: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: configured, else the PEAK_FLOPS entry, else None (CPU)."""
  if configured > 0:
    return float(configured)
  matches = [k for k in PEAK_FLOPS if k.lower() in device_kind.lower()]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def mfu(flops_per_tok: float | None, tokens_per_s: float | None, peak: float | None,
        n_devices: int) -> float | None:
  """Model FLOPs utilisation of `n_devices`, or None when any input is unknown."""
  if not (flops_per_tok and tokens_per_s and peak):
    return None
  return flops_per_tok * tokens_per_s / (peak * n_devices)
