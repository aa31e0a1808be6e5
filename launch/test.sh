#!/usr/bin/env bash
# The README's second command: set up (.venv, CPU stack) and run the test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LIVR_QUIET=1
bash "$(dirname "${BASH_SOURCE[0]}")/test_slurm_setup.sh"  # best effort: SLURM for tests/cluster/test_slurm.py
cd "$ROOT"
lint-imports --no-cache  # the layer rule (pyproject.toml [tool.importlinter]; docs/architecture.md)
exec python -m pytest -q tests "$@"
