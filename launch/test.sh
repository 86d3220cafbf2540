#!/usr/bin/env bash
# The test command: sets everything up, then runs the fast suite and the slow real-model suite.
#   bash launch/test.sh          # fast suite, then fetch the 0.5B Qwen (cached) and slow suite
#   bash launch/test.sh fast     # fast suite only (tiny random models; no download)
#   bash launch/test.sh slow     # slow suite only
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
what=${1:-all}
if [ "$what" = all ] || [ "$what" = fast ]; then
  python -m pytest -q
fi
if [ "$what" = all ] || [ "$what" = slow ]; then
  python -m stt_jax.models.fetch_demo
  python -m pytest -q -m slow
fi
