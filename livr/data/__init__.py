"""Data for livr: BLINK task names, the BLINK loader, synthetic tasks, prompts and answer parsing; rows encoded into
ids, labels and token groups (`sequence`), batched (`collate`, `packing`, `lengths`) and loaded (`loader`);
builders of the paper's training sets (`build`).

Layer: above `livr.method`; may import it, `livr.config` and `livr.utils`. Beside `livr.backbones`, which it never
imports (a family reaches the data only as an object handed to it). Never imports Ray, DeepSpeed or MLflow."""

from livr.data import packing as _packing  # noqa: F401 (registers the data.packing config check)
from livr.data.blink import load_blink, validate_dataset, validate_row
from livr.data.prompts import (
    PARSERS,
    answer_letter,
    blink_prompt,
    choice_letters,
    format_prompt,
    is_correct,
    parse_answer,
    target_text,
)
from livr.data.synthetic import features, generate_task, make_synthetic, task_options
from livr.data.tasks import BLINK_TASKS, IMAGE_COLUMNS, PAPER_TASKS, SYNTHETIC_TASKS, DataError

__all__ = [
    "BLINK_TASKS",
    "IMAGE_COLUMNS",
    "PAPER_TASKS",
    "PARSERS",
    "SYNTHETIC_TASKS",
    "DataError",
    "answer_letter",
    "blink_prompt",
    "choice_letters",
    "features",
    "format_prompt",
    "generate_task",
    "is_correct",
    "load_blink",
    "make_synthetic",
    "parse_answer",
    "target_text",
    "task_options",
    "validate_dataset",
    "validate_row",
]
