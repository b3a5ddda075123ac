#!/bin/bash
# One node of deploy/slurm/pretrain.sbatch (run by srun, once per node): torchrun with
# NPROC_PER_NODE workers joining the c10d rendezvous at MASTER_ADDR:MASTER_PORT.
# Usage: pretrain_node.sh CONFIG [key=value ...]
set -euo pipefail
# shellcheck source=deploy/slurm/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
config=${1:?usage: pretrain_node.sh CONFIG [key=value ...]}
shift
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-crossmae}" \
  --max-restarts 0 -m pipelines.pretrain --config "$config" --resume auto "$@"
