#!/usr/bin/env bash
# Creates ./.venv (once) and installs runtime + test requirements into it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.stt_jax_requirements
want=$(cat requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # The CPU torch wheel is found by pip on our machines; elsewhere fall back to PyPI's torch.
  python -m pip install -q -r requirements.txt -r requirements-test.txt || {
    echo "setup: retrying with plain torch (no +cpu wheel here)" >&2
    sed 's/^torch==.*+cpu.*/torch/' requirements-test.txt > .venv/req-test-fallback.txt
    python -m pip install -q -r requirements.txt -r .venv/req-test-fallback.txt
  }
  echo "$want" > "$stamp"
fi
