#!/usr/bin/env bash
# Set-up shared by the README's two commands: create .venv if missing and install livr into it
# (CPU torch pin from constraints.txt). Re-runs only when setup.py or constraints.txt change.
# GPU users: create .venv, install your CUDA torch into it first, then set LIVR_TORCH_PREINSTALLED=1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LIVR_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[livr] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.livr-installed"
WANT="$(cat "$ROOT/setup.py" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[livr] installing livr and its stack into $VENV (first time: a few minutes)"
  start=$SECONDS
  CONS="$ROOT/constraints.txt"
  if [ "${LIVR_TORCH_PREINSTALLED:-0}" = "1" ]; then
    CONS="$VENV/.constraints-no-torch.txt"; grep -v '^torch==' "$ROOT/constraints.txt" > "$CONS"
  else
    "$VENV/bin/pip" install -q "$(grep '^torch==' "$ROOT/constraints.txt")" 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  fi
  # (grep drops pip's noise about this machine's local find-links folders)
  DS_BUILD_OPS=0 PIP_CONSTRAINT="$CONS" "$VENV/bin/pip" install -q -c "$CONS" -e "${ROOT}[dev]" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  [ "${PIPESTATUS[0]}" = "0" ] || { echo "[livr] install failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
  echo "[livr] installed in $((SECONDS - start)) s"
fi
export PATH="$VENV/bin:$PATH"
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# DeepSpeed's JIT-built ops belong to this venv's torch: keep their cache inside the venv
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
# On a CPU machine, build DeepSpeed's JIT ops (shared-memory comm, CPU Adam for offloaded optimizers) once, at set-up,
# not in the first run or test that needs them (about 2 minutes the first time)
OPS_STAMP="$VENV/.livr-cpu-ops"
if [ "${DS_ACCELERATOR:-}" = "cpu" ] && [ "$(cat "$OPS_STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[livr] building DeepSpeed's CPU ops into $TORCH_EXTENSIONS_DIR (first time only)"
  start=$SECONDS
  if "$VENV/bin/python" -c "from livr.training.ds_setup import prebuild_cpu_ops; prebuild_cpu_ops()" >/dev/null 2>&1; then
    echo "$WANT" > "$OPS_STAMP"
    echo "[livr] built in $((SECONDS - start)) s"
  else
    echo "[livr] could not build DeepSpeed's CPU ops now; they build at first use" >&2
  fi
fi
