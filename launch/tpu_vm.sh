#!/usr/bin/env bash
# TPU VM (single host or pod slice): create, install on every worker, run main on every host.
#
#   export TPU=stt-v4-32 ZONE=us-central2-b TYPE=v4-32 VERSION=tpu-ubuntu2204-base
#   bash launch/tpu_vm.sh create
#   bash launch/tpu_vm.sh install            # copies this repo to every worker, installs jax[tpu]
#   bash launch/tpu_vm.sh run configs/mgsm_th.py /mnt/shared/workdir --config.model.path=/mnt/shared/Llama-2-7b-hf
#   bash launch/tpu_vm.sh eval configs/mgsm_th.py /mnt/shared/workdir ...   # optional separate eval loop
#
# Every host runs the same command; `jax.distributed.initialize()` finds the others on TPU
# VMs by itself (stt_jax.main calls it when TPU_WORKER_HOSTNAMES is set). The workdir and the
# model folder must be on storage every worker sees (NFS / Filestore / gcsfuse mount): hosts
# write their translation and eval slices there and process 0 merges them.
set -euo pipefail
cmd=${1:?create|install|run|eval|delete}; shift || true
: "${TPU:?set TPU (name)}" "${ZONE:?set ZONE}"
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }
case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type "${TYPE:?set TYPE}" \
      --version "${VERSION:-tpu-ubuntu2204-base}" ;;
  install)
    gcloud compute tpus tpu-vm scp --zone "$ZONE" --worker=all --recurse "$(dirname "$0")/.." "$TPU":~/stt_jax
    ssh_all "cd ~/stt_jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
      pip install -q -r requirements.txt && pip install -q -U 'jax[tpu]'" ;;
  run|eval)
    config=${1:?config}; workdir=${2:?workdir}; shift 2
    module=stt_jax.main; [ "$cmd" = eval ] && module=stt_jax.evaluate
    ssh_all "cd ~/stt_jax && . .venv/bin/activate && python -m $module --config=$config --workdir=$workdir $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU" --zone "$ZONE" --quiet ;;
  *) echo "usage: $0 create|install|run|eval|delete" >&2; exit 2 ;;
esac
