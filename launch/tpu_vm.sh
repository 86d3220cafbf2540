#!/usr/bin/env bash
# TPU VM (single host or pod slice): create, install on every worker, run main on every host.
#
#   export TPU=stt-v4-32 ZONE=us-central2-b TYPE=v4-32 VERSION=tpu-ubuntu2204-base
#   bash launch/tpu_vm.sh create
#   bash launch/tpu_vm.sh install            # copies this repo to every worker, installs jax[tpu]
#   bash launch/tpu_vm.sh run configs/mgsm_th.py /mnt/shared/workdir --config.model.path=/mnt/shared/Llama-2-7b-hf
#   bash launch/tpu_vm.sh eval configs/mgsm_th.py /mnt/shared/workdir ...   # optional separate eval loop
#   bash launch/tpu_vm.sh --dry-run run configs/mgsm_th.py /w   # print the gcloud commands only
#
# --dry-run (anywhere on the command line) or DRY_RUN=1 prints each gcloud command, one per
# line, shell-quoted, instead of running it (gcloud need not be installed). Plan the memory
# first: python -m stt_jax.memory_plan --config=configs/mgsm_th.py --chip=v4-8 (docs/tpu.md).
#
# Every host runs the same command; `jax.distributed.initialize()` finds the others on TPU
# VMs by itself (stt_jax.main calls it when TPU_WORKER_HOSTNAMES is set). The workdir and the
# model folder must be on storage every worker sees (NFS / Filestore / gcsfuse mount): hosts
# write their translation and eval slices there and process 0 merges them.
set -euo pipefail
dry=${DRY_RUN:-0}
args=()
for a in "$@"; do
  if [ "$a" = --dry-run ]; then dry=1; else args+=("$a"); fi
done
set -- ${args[@]+"${args[@]}"}
cmd=${1:?create|install|run|eval|delete}; shift || true
: "${TPU:?set TPU (name)}" "${ZONE:?set ZONE}"
quote() {  # One word as the shell reads it back: bare when safe, else in single quotes.
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
gc() {  # gcloud, or under --dry-run its exact command line on one line of stdout.
  if [ "$dry" != 1 ]; then gcloud "$@"; return; fi
  local line=gcloud w
  for w in "$@"; do line+=" $(quote "$w")"; done
  echo "$line"
}
ssh_all() { gc compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"; }
case "$cmd" in
  create)
    gc compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type "${TYPE:?set TYPE}" \
      --version "${VERSION:-tpu-ubuntu2204-base}" ;;
  install)
    gc compute tpus tpu-vm scp --zone "$ZONE" --worker=all --recurse "$(dirname "$0")/.." "$TPU":~/stt_jax
    ssh_all "cd ~/stt_jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
      pip install -q -r requirements.txt && pip install -q -U 'jax[tpu]'" ;;
  run|eval)
    config=${1:?config}; workdir=${2:?workdir}; shift 2
    module=stt_jax.main; [ "$cmd" = eval ] && module=stt_jax.evaluate
    extra=""; for a in "$@"; do extra+=" $(quote "$a")"; done  # Quoted for the remote shell.
    flags="$(quote "--config=$config") $(quote "--workdir=$workdir")$extra"
    ssh_all "cd ~/stt_jax && . .venv/bin/activate && python -m $module $flags" ;;
  delete)
    gc compute tpus tpu-vm delete "$TPU" --zone "$ZONE" --quiet ;;
  *) echo "usage: $0 [--dry-run] create|install|run|eval|delete" >&2; exit 2 ;;
esac
