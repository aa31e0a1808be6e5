"""Task names (BLINK's config names), the data-layer error type, and the config check of `data.tasks`."""

from __future__ import annotations

import difflib

from livr.config import ConfigError, register_check

# The paper's nine tasks, in Table-1 column order.
PAPER_TASKS: tuple[str, ...] = (
    "Counting",
    "Jigsaw",
    "Object_Localization",
    "Visual_Correspondence",
    "Art_Style",
    "Semantic_Correspondence",
    "Functional_Correspondence",
    "Relative_Reflectance",
    "Visual_Similarity",
)

# Every BLINK config: the paper's nine, then BLINK's five others.
BLINK_TASKS: tuple[str, ...] = PAPER_TASKS + (
    "IQ_Test",
    "Multi-view_Reasoning",
    "Forensic_Detection",
    "Relative_Depth",
    "Spatial_Relation",
)

# Tasks with a procedural generator (livr.data.synthetic), in Table-1 order.
SYNTHETIC_TASKS: tuple[str, ...] = (
    "Counting",
    "Jigsaw",
    "Object_Localization",
    "Relative_Reflectance",
    "Visual_Similarity",
)

# Tasks whose rows may be open-ended (no choices, a number as the answer): livr's synthetic Counting has an
# open mode (data.options mode=open). BLINK's own rows are all multiple choice, Counting included; a row of any
# other task without choices is an error (livr.data.blink.validate_row).
OPEN_ENDED_TASKS: tuple[str, ...] = ("Counting",)

# BLINK's columns, in order.
COLUMNS: tuple[str, ...] = (
    "idx", "question", "sub_task", "image_1", "image_2", "image_3", "image_4",
    "choices", "answer", "prompt", "explanation",
)
IMAGE_COLUMNS: tuple[str, ...] = ("image_1", "image_2", "image_3", "image_4")


class DataError(ValueError):
    """A data problem: unknown task, missing split, malformed or undecodable row."""


def check_task(task: str, valid: tuple[str, ...] = BLINK_TASKS, what: str = "task") -> str:
    """Return `task` if it is in `valid`, else raise a DataError listing the valid names."""
    if task not in valid:
        raise DataError(f"unknown {what} {task!r} (valid: {', '.join(valid)})")
    return task


def _task_hint(task: str, valid: tuple) -> str:
    """' (did you mean 'Counting'?)' for a near miss; the list syntax for a comma-separated string."""
    if "," in task:
        names = [t.strip() for t in task.split(",")]
        return f" (a list is written data.tasks=[{','.join(names)}])"
    folded = {v.lower(): v for v in valid}
    close = [folded[task.lower()]] if task.lower() in folded else \
        [folded[m] for m in difflib.get_close_matches(task.lower(), list(folded), n=1, cutoff=0.6)]
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_tasks(cfg) -> None:
    """`data.tasks` names tasks of its source: BLINK's configs, or the synthetic generators' (one line, with the
    likely spelling or the list syntax)."""
    synthetic = "synthetic" in (cfg.data.source, cfg.data.test_source)
    valid = SYNTHETIC_TASKS if synthetic else BLINK_TASKS
    for t in cfg.data.tasks:
        if t not in valid:
            raise ConfigError(f"config: data.tasks={t!r}: unknown task {t!r}{_task_hint(t, valid)} for source "
                              f"'{'synthetic' if synthetic else cfg.data.source}' (valid: {', '.join(valid)})")


register_check("data.tasks", check_tasks)
