#!/usr/bin/env bash
# The CPU demo, end to end: set up .venv, fetch the 0.5B Qwen (once), run configs/demo.py.
#   bash launch/demo.sh [WORKDIR] [--config.x=y ...]     (default WORKDIR: ./workdirs/demo)
# Rerunning continues where it stopped; a finished run only reprints the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
workdir=${1:-workdirs/demo}
shift || true
python -m stt_jax.models.fetch_demo
python -m stt_jax.main --config=configs/demo.py --workdir="$workdir" "$@"
