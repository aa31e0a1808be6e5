#!/usr/bin/env bash
# The README's first command: set up (.venv, CPU stack) and run the CPU demo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$ROOT"
exec livr demo --config configs/demo.yaml "$@"
