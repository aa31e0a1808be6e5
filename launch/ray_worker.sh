#!/usr/bin/env bash
# Join a machine to a running livr Ray cluster.
#
#   bash launch/ray_worker.sh --address HEAD_IP:6379 [-- extra `ray start` args, e.g. --num-gpus 8]
set -euo pipefail
ADDRESS="${RAY_HEAD_ADDRESS:-}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "ray_worker.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$ADDRESS" ] || { echo "ray_worker.sh: --address HEAD_IP:PORT is required" >&2; exit 2; }
exec ray start --address "$ADDRESS" --block "${EXTRA[@]}"
