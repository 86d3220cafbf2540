"""GSM8K (English) -> MGSM (Chinese), Llama-2-7B on a TPU VM (settings: base.paper_config).

    python -m stt_jax.main --config=configs/mgsm_zh.py --workdir=/path/to/workdir \
        --config.model.path=/models/Llama-2-7b-hf
"""

from configs import base


def get_config():
  return base.paper_config("mgsm", "zh")
