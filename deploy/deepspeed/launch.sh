#!/bin/bash
# crossmae-pretrain under the DeepSpeed launcher, in one of three forms:
#
#   NUM_GPUS=8 launch.sh --local CONFIG [key=value ...]
#       one machine, NUM_GPUS processes on localhost. Without a GPU (no nvidia-smi) it runs on
#       the CPU: DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1 per process, gloo, fp32.
#   HOSTFILE=hostfile launch.sh --hostfile CONFIG [key=value ...]
#       from one node: the launcher reaches every host of HOSTFILE with pdsh over passwordless
#       ssh; the environment of .deepspeed_env (./ or ~/) is exported on every node.
#   HOSTFILE=hostfile NODE_RANK=i MASTER_ADDR=host0 launch.sh --no-ssh CONFIG [key=value ...]
#       clusters without ssh between nodes: run the same command on EVERY node, each with its
#       own NODE_RANK (0 .. NUM_NODES-1); MASTER_ADDR is node 0's address.
#
# Environment: NUM_GPUS (per node; default: slots of the hostfile / all local GPUs),
# NUM_NODES (default: hosts in HOSTFILE), MASTER_PORT (default 29500), DEEPSPEED (the launcher
# binary), DRY_RUN=1 (print the command only). The run always starts with --resume auto: a
# restarted launch continues from the newest complete checkpoint.
set -euo pipefail
usage="usage: launch.sh --local|--hostfile|--no-ssh CONFIG [key=value ...]"
mode=${1:-}
config=${2:-}
if [[ $mode != --local && $mode != --hostfile && $mode != --no-ssh ]] || [[ -z $config ]]; then
  echo "$usage" >&2
  exit 2
fi
shift 2
if [[ ! -f $config ]]; then
  echo "launch.sh: config $config not found" >&2
  exit 2
fi
deepspeed_bin=${DEEPSPEED:-deepspeed}
cmd=("$deepspeed_bin")
if [[ $mode == --local ]]; then
  if [[ -z ${DS_ACCELERATOR:-} ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=cpu  # no GPU: DeepSpeed's CPU accelerator, gloo
  fi
  if [[ ${DS_ACCELERATOR:-} == cpu ]]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the launcher does not set it: 2 ranks x all cores thrash
  fi
  [[ -n ${NUM_GPUS:-} ]] && cmd+=(--num_gpus "$NUM_GPUS")
  cmd+=(--master_port "${MASTER_PORT:-29500}")
else
  hostfile=${HOSTFILE:?set HOSTFILE (lines "host slots=N"; deploy/deepspeed/hostfile.example)}
  if [[ ! -f $hostfile ]]; then
    echo "launch.sh: hostfile $hostfile not found" >&2
    exit 2
  fi
  hosts=$(grep -cvE '^[[:space:]]*(#|$)' "$hostfile" || true)
  cmd+=(--hostfile "$hostfile" --num_nodes "${NUM_NODES:-$hosts}" --master_port "${MASTER_PORT:-29500}")
  [[ -n ${NUM_GPUS:-} ]] && cmd+=(--num_gpus "$NUM_GPUS")
  if [[ $mode == --hostfile ]]; then
    cmd+=(--launcher pdsh)
    [[ -n ${MASTER_ADDR:-} ]] && cmd+=(--master_addr "$MASTER_ADDR")  # default: first host's `hostname -I`
  else
    cmd+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK (this node: 0 .. NUM_NODES-1)}"
      --master_addr "${MASTER_ADDR:?set MASTER_ADDR (node 0)}")
  fi
fi
cmd+=(--module pipelines.pretrain --config "$config" --resume auto "$@")
echo "launch.sh: ${cmd[*]}" >&2
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exit 0
fi
exec "${cmd[@]}"
