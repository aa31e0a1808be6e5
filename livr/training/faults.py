"""Test hooks that plant faults in a real run (set by tests through the environment; nothing happens otherwise)."""
from __future__ import annotations

import os


def injected_failure(global_step: int, rank: int) -> None:
    """Test hook: LIVR_FAIL_AT_STEP=N [LIVR_FAIL_RANK=r] [LIVR_FAIL_MODE=raise|exit] [LIVR_FAIL_MARKER=file]
    makes rank r fail once after optimizer step N (the marker file records that it already failed)."""
    at = os.environ.get("LIVR_FAIL_AT_STEP")
    if not at or int(at) != global_step or int(os.environ.get("LIVR_FAIL_RANK", "0")) != rank:
        return
    marker = os.environ.get("LIVR_FAIL_MARKER")
    if marker:
        if os.path.exists(marker):
            return
        open(marker, "w").close()
    if os.environ.get("LIVR_FAIL_MODE") == "exit":
        os._exit(17)
    raise RuntimeError(f"injected failure at step {global_step} (LIVR_FAIL_AT_STEP)")


def injected_nan(global_step: int, rank: int) -> bool:
    """Test hook: LIVR_NAN_AT_STEPS=N[,M...] [LIVR_NAN_RANK=r] makes rank r's loss (and so its gradients) NaN in
    those optimizer steps."""
    at = os.environ.get("LIVR_NAN_AT_STEPS")
    return bool(at) and str(global_step) in at.split(",") and int(os.environ.get("LIVR_NAN_RANK", rank)) == rank
