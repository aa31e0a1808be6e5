#!/usr/bin/env bash
# Start the Ray head node of a livr cluster.
#
#   bash launch/ray_head.sh [--port 6379] [--dashboard-host 127.0.0.1] [-- extra `ray start` args]
#
# Then on every other machine: bash launch/ray_worker.sh --address HEAD_IP:6379
# and submit jobs with launch/submit.sh. The dashboard (and the job API on :8265) binds to loopback by
# default; reach it through an SSH tunnel, or pass --dashboard-host 0.0.0.0 on a trusted network.
# Ray 2.60 uses token authentication by default: the token is in ~/.ray/auth_token on the head; copy it to
# the workers (or export RAY_AUTH_TOKEN) before they join.
set -euo pipefail
PORT=6379
DASH_HOST=127.0.0.1
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --dashboard-host) DASH_HOST="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "ray_head.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
exec ray start --head --port "$PORT" --dashboard-host "$DASH_HOST" --dashboard-port 8265 "${EXTRA[@]}"
