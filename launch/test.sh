#!/usr/bin/env bash
# The test command: sets everything up, then runs the fast suite, the fault-injection suite
# and the slow real-model suite.
#   bash launch/test.sh          # all three (fetches the 0.5B Qwen and Gemma 3 270M once, then cached)
#   bash launch/test.sh fast     # fast suite only (tiny random models; no download)
#   bash launch/test.sh faults   # kill -9 / torn-write / disk-full suite (tests/reliability)
#   bash launch/test.sh slow     # slow suite only
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
what=${1:-all}
if [ "$what" = all ] || [ "$what" = fast ]; then
  python -m pytest -q --durations=15
fi
if [ "$what" = all ] || [ "$what" = faults ]; then
  python -m pytest -q -m faults --durations=10
fi
if [ "$what" = all ] || [ "$what" = slow ]; then
  python -m stt_jax.models.fetch_demo
  python -m stt_jax.models.fetch_demo --model gemma3-270m
  python -m pytest -q -m slow --durations=10
fi
