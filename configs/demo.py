"""The CPU demo: the real 0.5B Qwen, MultiNLI -> XNLI Chinese, zero-shot transfer vs
Self-Translate-Train, LoRA, in about half an hour on 2 CPU cores.

    bash launch/demo.sh          # fetches the model, then runs this config

Sizes are chosen for the budget (see README "Demo"): a few hundred English training pairs are
self-translated; each variant gets a short LoRA run; the test set is the first `eval.limit`
XNLI-zh items (label log-likelihood), reported with bootstrap 95% intervals.
"""

from stt_jax import run_config


def get_config():
  return run_config.demo_config()  # Its settings, with the reason for each: run_config.py.
