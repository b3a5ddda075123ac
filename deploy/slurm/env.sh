# shellcheck shell=bash
# Sourced inside a Slurm allocation (batch script or srun task): derives the torchrun /
# DeepSpeed rendezvous variables from SLURM_* and exports them.
#
#   MASTER_ADDR     first host of SLURM_JOB_NODELIST (scontrol show hostnames; a bash parser
#                   of the compressed form gpu[01-04,07] when scontrol is absent)
#   MASTER_PORT     20000 + job id mod 20000: the same on every node, different per job
#   NNODES          SLURM_JOB_NUM_NODES (or SLURM_NNODES)
#   NODE_RANK       SLURM_NODEID (this node's index in the allocation)
#   NPROC_PER_NODE  SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE ("8" or "a100:8"), else the
#                   entries of CUDA_VISIBLE_DEVICES, else 1 (a count of 0 counts as none)
#   WORLD_SIZE      NNODES x NPROC_PER_NODE
# Values already set in the environment win (MASTER_PORT=29500 sbatch ...). Functions:
# crossmae_expand_nodelist LIST (one host per line), crossmae_hostfile LIST SLOTS (a DeepSpeed
# hostfile). CROSSMAE_VENV=/path/.venv activates that virtualenv.

# One item of a node list, e.g. "gpu[01-03,07]" or "rack[1-2]-n[08-09]": one host per line.
_crossmae_expand_item() {
  local item=$1
  if [[ $item =~ ^([^[]*)\[([^]]*)\](.*)$ ]]; then
    local pre=${BASH_REMATCH[1]} body=${BASH_REMATCH[2]} post=${BASH_REMATCH[3]} part lo hi n
    local -a parts
    IFS=, read -ra parts <<< "$body"
    for part in "${parts[@]}"; do
      lo=${part%-*} hi=${part#*-}  # "07" -> lo = hi = 07; "01-04" -> 01, 04
      for ((n = 10#$lo; n <= 10#$hi; n++)); do  # 10#: "08" is decimal, not octal
        _crossmae_expand_item "$pre$(printf "%0${#lo}d" "$n")$post"
      done
    done
  else
    printf '%s\n' "$item"
  fi
}

# Slurm's compressed node list -> one host per line (commas inside brackets do not split).
crossmae_expand_nodelist() {
  local list=$1 item="" depth=0 c i
  for ((i = 0; i < ${#list}; i++)); do
    c=${list:i:1}
    case $c in
      "[") depth=$((depth + 1)) ;;
      "]") depth=$((depth - 1)) ;;
      ",") if ((depth == 0)); then _crossmae_expand_item "$item"; item=""; continue; fi ;;
    esac
    item+=$c
  done
  [[ -n $item ]] && _crossmae_expand_item "$item"
  return 0
}

# "host slots=N" per node: the hostfile of `deepspeed --hostfile` (deploy/deepspeed/launch.sh).
crossmae_hostfile() {
  local host
  crossmae_expand_nodelist "$1" | while read -r host; do printf '%s slots=%s\n' "$host" "$2"; done
}

_crossmae_first_host() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1" | head -n 1
  else
    crossmae_expand_nodelist "$1" | head -n 1
  fi
}

_crossmae_gpus_per_node() {
  local per_node=${SLURM_GPUS_PER_NODE:-}
  per_node=${per_node##*:}  # "a100:8" -> 8
  # A count of 0 (sbatch --gpus-per-node=0 on a CPU partition sets SLURM_GPUS_ON_NODE=0) is no
  # count: torchrun refuses --nproc-per-node 0 with a bare AssertionError.
  if [[ -n ${SLURM_GPUS_ON_NODE:-} && $SLURM_GPUS_ON_NODE != 0 ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n $per_node && $per_node != 0 ]]; then
    echo "$per_node"
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    local -a devices
    IFS=, read -ra devices <<< "$CUDA_VISIBLE_DEVICES"
    echo "${#devices[@]}"
  else
    echo 1  # no GPU: one (CPU) process per node
  fi
}

if [[ -z ${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}} && -z ${MASTER_ADDR:-} ]]; then
  echo "deploy/slurm/env.sh: not inside a Slurm allocation (SLURM_JOB_NODELIST unset) and MASTER_ADDR not set" >&2
  return 1  # sourced, never executed
fi
if [[ -n ${CROSSMAE_VENV:-} ]]; then
  # shellcheck source=/dev/null
  source "$CROSSMAE_VENV/bin/activate"
fi
MASTER_ADDR=${MASTER_ADDR:-$(_crossmae_first_host "${SLURM_JOB_NODELIST:-$SLURM_NODELIST}")}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(_crossmae_gpus_per_node)}
WORLD_SIZE=$((NNODES * NPROC_PER_NODE))
export MASTER_ADDR MASTER_PORT NNODES NODE_RANK NPROC_PER_NODE WORLD_SIZE
