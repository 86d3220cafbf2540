"""SQuAD v1.1 (English) -> XQuAD (Chinese), Llama-2-7B on a TPU VM (settings: run_config.paper_config).

    python -m stt_jax.main --config=configs/xquad_zh.py --workdir=/path/to/workdir \
        --config.model.path=/models/Llama-2-7b-hf
"""

from stt_jax import run_config


def get_config():
  return run_config.paper_config("xquad", "zh")
