"""MultiNLI (English) -> XNLI (Thai), Llama-2-7B on a TPU VM (settings: base.paper_config).

    python -m stt_jax.main --config=configs/xnli_th.py --workdir=/path/to/workdir \
        --config.model.path=/models/Llama-2-7b-hf
"""

from configs import base


def get_config():
  return base.paper_config("xnli", "th")
