#!/usr/bin/env bash
# Start an MLflow tracking server for livr runs (tracking.uri=http://HOST:PORT).
#
#   bash launch/mlflow_server.sh [--host 127.0.0.1] [--port 5000] \
#        [--backend-store-uri sqlite:///$PWD/mlflow.db] [--artifacts-destination $PWD/mlartifacts] \
#        [--workers 4] [-- extra mlflow server args]
#
# Binds to the loopback interface by default: the server has no authentication, so expose it (--host 0.0.0.0)
# only on a trusted network or behind an authenticating proxy. Runs `mlflow server` from the project's .venv
# (or $LIVR_VENV), else from PATH, in the foreground (exec): stop it with Ctrl-C / SIGTERM.
# Artifacts are proxied through the server (--serve-artifacts), so clients need no access to the artifact store.
# MLflow's background job executor (GenAI features livr does not use) is off unless
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true is set.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlartifacts}"
WORKERS="${MLFLOW_WORKERS:-4}"
EXTRA=()

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --backend-store-uri) BACKEND="$2"; shift 2 ;;
    --artifacts-destination) ARTIFACTS="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "mlflow_server.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

VENV="${LIVR_VENV:-$ROOT/.venv}"
if [ -x "$VENV/bin/mlflow" ]; then
  MLFLOW="$VENV/bin/mlflow"
elif command -v mlflow >/dev/null 2>&1; then
  MLFLOW="$(command -v mlflow)"
else
  echo "mlflow_server.sh: no mlflow in $VENV/bin or on PATH (install livr first: bash launch/test.sh sets up .venv)" >&2
  exit 1
fi

case "$ARTIFACTS" in
  *://*) ;;  # s3://, gs://, ... : leave as is
  *) mkdir -p "$ARTIFACTS" ;;
esac

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "[livr] MLflow server on http://$HOST:$PORT (backend $BACKEND, artifacts $ARTIFACTS)"
exec "$MLFLOW" server --host "$HOST" --port "$PORT" --backend-store-uri "$BACKEND" \
  --artifacts-destination "$ARTIFACTS" --serve-artifacts --workers "$WORKERS" "${EXTRA[@]}"
