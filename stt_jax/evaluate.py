"""`python -m stt_jax.evaluate`: the separate eval loop, under the name users know.

The stage lives in stt_jax.stages.evaluate; this module only starts it.
"""

from stt_jax import cli
from stt_jax.stages import evaluate

if __name__ == "__main__":
  cli.run_entry_point("stt_jax.evaluate", evaluate.main)
