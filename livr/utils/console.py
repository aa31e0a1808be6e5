"""What livr's console shows. Set up where livr starts (`livr.cli.main`), never on import of the library:

- known third-party noise, filtered at its source by its exact message (a warnings filter, or a logging filter on
  the one logger that emits it), so that every other warning still shows;
- progress bars only on a terminal: written to a file or a pipe, a bar is a stream of carriage returns and
  cursor-up escape codes (`\\x1b[A`); there livr prints one line per epoch instead (`livr.training.train`).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

# (category, message regex): each a known, harmless message of a pinned dependency.
NOISE_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # transformers 5.x, on every PEFT model load
)
# logger name -> message prefixes dropped from it.
NOISE_LOGS = {
    "DeepSpeed": ("Setting accelerator to CPU",),  # on import without a GPU (the export, the engine)
    "ray.train.v2._internal.execution.controller.placement_group_cleaner":
        ("Failed to query Ray Train Controller actor state",),  # polled while the controller shuts down
    "transformers.processing_utils": ("`PaddleOCRVLProcessor` defines `image_processor_class",),  # livr export's check
    "mlflow.store.db.utils": ("Creating initial MLflow database tables", "Updating database tables"),  # a new sqlite store
}


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Filter NOISE_WARNINGS and NOISE_LOGS in this process (idempotent)."""
    for category, message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in NOISE_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefixes))


def on_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_disabled(quiet: bool) -> bool | None:
    """tqdm's `disable=` for livr's bars: off when quiet, else None (tqdm: off when its stream is not a terminal)."""
    return True if quiet else None


def plain_progress() -> None:
    """Not on a terminal: switch off the progress bars of the libraries livr calls (datasets, huggingface_hub,
    transformers, plain tqdm), for this process and the processes it starts."""
    if on_terminal():
        return
    for key in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(key, "1")  # (transformers follows huggingface_hub's setting)
    # a library already imported read those variables at its import: switch its bars off directly
    for module, off in (("transformers.utils.logging", "disable_progress_bar"),
                        ("huggingface_hub.utils", "disable_progress_bars"),
                        ("datasets.utils.logging", "disable_progress_bar")):
        if module in sys.modules:
            getattr(sys.modules[module], off)()
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's worker-log prefixes without ANSI colour codes


# Ray workers and actors (the Train controller's placement-group cleaner among them) run this at start-up:
# `ray.init(runtime_env={"worker_process_setup_hook": WORKER_SETUP})` (livr.cluster.ray_train, livr.cluster.tune).
WORKER_SETUP = "livr.utils.console.quiet_third_party"


def setup() -> None:
    quiet_third_party()
    plain_progress()
