#!/usr/bin/env bash
# Submit `livr train` (or `livr tune`) to a running Ray cluster as a Ray job.
#
#   bash launch/submit.sh [--address http://127.0.0.1:8265] [--tune] CONFIG [key=value ...]
#
# The working directory (this repository) is shipped with the job; the cluster's Python environment must
# have livr's stack installed (the Docker image, or `pip install -e .` on every node). Checkpoints go to
# distributed.storage_path: set it to shared storage (an NFS path mounted on every node, or s3:// / gs://).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
CMD=train
while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --tune) CMD=tune; shift ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: submit.sh [--address URL] [--tune] CONFIG [key=value ...]" >&2; exit 2; }
CONFIG="$1"; shift
ENV_JSON='{"env_vars": {"HF_HUB_OFFLINE": "'"${HF_HUB_OFFLINE:-0}"'", "TOKENIZERS_PARALLELISM": "false"}}'
exec ray job submit --address "$ADDRESS" --working-dir "$ROOT" --runtime-env-json "$ENV_JSON" \
  -- livr "$CMD" --config "$CONFIG" distributed.address=auto "$@"
