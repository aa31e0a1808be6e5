#!/usr/bin/env bash
# Single-GPU mode (3B/4B backbones): one process, no Ray.
#
#   bash launch/single_gpu.sh CONFIG [key=value ...]
#   e.g. bash launch/single_gpu.sh configs/paper/qwen2.5-vl-3b/Jigsaw_livr.yaml model.gradient_checkpointing=true
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: single_gpu.sh CONFIG [key=value ...]" >&2; exit 2; }
CONFIG="$1"; shift
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
exec "${LIVR_VENV:-$ROOT/.venv}/bin/livr" train --config "$CONFIG" distributed.num_workers=0 model.device=auto "$@"
