"""Putting a finished directory in place atomically (light: no torch import, for the data builders too)."""
from __future__ import annotations

import os
import shutil


def replace_dir(tmp: str, final: str) -> None:
    """Move the complete directory `tmp` to `final` (same filesystem), replacing what is there: the old copy is
    moved aside first and removed only after the swap, so `final` is always absent, old or new, never partial."""
    old = None
    if os.path.exists(final):
        old = f"{tmp}.old"
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
