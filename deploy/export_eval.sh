#!/bin/bash
# Export and evaluate ONE checkpoint of a run: the INDEX-th complete checkpoint in STORE
# (oldest first). Used by deploy/slurm/export_eval.sbatch (INDEX = SLURM_ARRAY_TASK_ID) and
# deploy/k8s/export-eval-job.yaml (INDEX = JOB_COMPLETION_INDEX). Both tools skip work that
# is already done, so re-running a task is cheap.
#
#   STORE=s3://b/runs/vitb EXPORTS=s3://b/exports/vitb TRAIN_MANIFEST=... VAL_MANIFEST=... \
#       deploy/export_eval.sh INDEX
#
# EVALS: comma-separated crossmae-eval jobs (default knn; knn,linprobe for both).
set -euo pipefail
index=${1:?usage: export_eval.sh INDEX (0 = the oldest complete checkpoint)}
: "${STORE:?set STORE: the run directory or run.store (local or s3://)}"
: "${EXPORTS:?set EXPORTS: the export root}"
: "${TRAIN_MANIFEST:?set TRAIN_MANIFEST}" "${VAL_MANIFEST:?set VAL_MANIFEST}"
PYTHON=${PYTHON:-python}
found=$("$PYTHON" -c '
import sys
from pipelines import storage
from pipelines.checkpoints.export import complete_steps
try:
    tags = sorted(complete_steps(sys.argv[1]).items(), key=lambda kv: kv[1])
except (storage.StorageError, OSError) as e:
    sys.exit(f"export_eval: cannot list checkpoints in {sys.argv[1]}: {e}")
i = int(sys.argv[2])
print(len(tags), tags[i][0] if i < len(tags) else "")
' "$STORE" "$index")
read -r count tag <<< "$found"
if [[ -z $tag ]]; then
  echo "export_eval: index $index: $STORE has only $count complete checkpoint(s); nothing to do" >&2
  exit 0
fi
echo "export_eval: index $index -> $tag" >&2
crossmae-export "$STORE" "$EXPORTS" --select "tags:$tag"
IFS=, read -ra jobs <<< "${EVALS:-knn}"
for job in "${jobs[@]}"; do
  crossmae-eval "$job" --train "$TRAIN_MANIFEST" --val "$VAL_MANIFEST" "${EXPORTS%/}/$tag"
done
