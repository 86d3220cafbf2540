#!/usr/bin/env bash
# One GPU host (CUDA 12): install jax[cuda12] into .venv and run a config.
#   bash launch/gpu.sh configs/mgsm_zh.py /path/to/workdir --config.model.path=/models/Llama-2-7b-hf
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?config file}; workdir=${2:?workdir}; shift 2
bash launch/setup.sh
. .venv/bin/activate
python -c "import jax; assert jax.devices()[0].platform == 'gpu'" 2>/dev/null ||
  python -m pip install -q "jax[cuda12]"
# Let XLA use most of the GPU memory and keep the run's compute in bf16 (config default).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
python -m stt_jax.main --config="$config" --workdir="$workdir" "$@"
