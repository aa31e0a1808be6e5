"""Load BLINK-schema data (from the hub or a local copy) and validate every row."""

from __future__ import annotations

import glob
import io
import os
import re

from livr.data.prompts import choice_letters
from livr.data.tasks import BLINK_TASKS, COLUMNS, IMAGE_COLUMNS, OPEN_ENDED_TASKS, DataError, check_task

HIDDEN_ANSWER = "hidden"  # BLINK's test split hides its answers behind this value
REQUIRED = ("idx", "question", "choices", "answer", "image_1")
# How BLINK's texts name an image slot: "the second image" (its prompts and choices), "Image 2", "image_2".
_ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6}
_IMAGE_REF = re.compile(r"\b(?:image[ _#-]?([1-9])|(first|second|third|fourth|fifth|sixth) image)\b", re.IGNORECASE)


def _image_problem(value) -> str | None:
    """None if `value` (PIL image, {'bytes', 'path'} dict, bytes or path) is an image file PIL can open, else
    what is wrong with it. Only the header is read (`verify`), so checking 6,000 rows of 1000-px images is cheap; a
    file that is damaged past its header is reported, with its row, when the row is first encoded. Decompression
    bombs and absurd sizes are refused from the header (livr.data.images)."""
    from PIL import Image

    from livr.data.images import image_problem, refuse_bombs

    if isinstance(value, Image.Image):
        return None
    try:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            src = io.BytesIO(data) if data is not None else path
        elif isinstance(value, (bytes, bytearray)):
            src = io.BytesIO(value)
        else:
            src = value
        with refuse_bombs(), Image.open(src) as im:
            im.verify()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types (UnidentifiedImageError, OSError, ...)
        return image_problem(e)


def _present(value) -> bool:
    if isinstance(value, dict):
        return value.get("bytes") is not None or bool(value.get("path"))
    return value is not None


def validate_row(row: dict, task: str, split: str, *, position: int | None = None) -> None:
    """Raise a one-line DataError naming task, split and idx if the row is not valid BLINK data."""
    idx = row.get("idx")
    where = f"{task}/{split} idx={idx}" if idx not in (None, "") else f"{task}/{split} row {position}"

    def fail(msg: str):
        raise DataError(f"{where}: {msg}")

    if not isinstance(idx, str) or not idx.strip():
        fail("missing idx")
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        fail("empty question")
    choices = row.get("choices")
    if choices is None:
        choices = []
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        fail(f"choices must be a list of strings, got {choices!r}")
    if len(choices) > 26:
        fail(f"{len(choices)} choices (at most 26)")
    answer = row.get("answer")
    if not isinstance(answer, str):
        fail(f"answer must be a string, got {answer!r}")
    if not choices and task not in OPEN_ENDED_TASKS:
        fail(f"no choices, but {task} is a multiple-choice task")
    if choices:
        letters = choice_letters(len(choices))
        m = re.fullmatch(r"\(([A-Z])\)", answer.strip())
        hidden = answer == HIDDEN_ANSWER and split.startswith("test")
        if not hidden and (not m or m.group(1) not in letters):
            fail(f"answer {answer!r} is not among the {len(choices)} choices ({letters[0]})-({letters[-1]})")
    elif not answer.strip():
        fail("empty answer (open-ended row: no choices)")
    elif re.fullmatch(r"\([A-Z]\)", answer.strip()):
        fail(f"answer {answer!r} is a choice letter, but the row has no choices")
    present = [_present(row.get(c)) for c in IMAGE_COLUMNS]
    if not present[0]:
        fail("image_1 is missing")
    for k in range(1, len(IMAGE_COLUMNS)):
        if present[k] and not all(present[:k]):
            gap = IMAGE_COLUMNS[present[:k].index(False)]
            fail(f"{IMAGE_COLUMNS[k]} is present but {gap} is missing")
    _check_image_refs(row, sum(present), fail)
    for c, p in zip(IMAGE_COLUMNS, present):
        if p:
            problem = _image_problem(row[c])
            if problem:
                fail(f"{c} {problem}")


def _check_image_refs(row: dict, images: int, fail) -> None:
    """A question, prompt or choice that names an image slot the row leaves empty ("the second image" in a
    one-image row) asks about a picture the model never sees."""
    texts = [("question", row.get("question")), ("prompt", row.get("prompt"))]
    texts += [(f"choices[{i}]", c) for i, c in enumerate(row.get("choices") or [])]
    for field, text in texts:
        for m in _IMAGE_REF.finditer(text or ""):
            k = int(m.group(1)) if m.group(1) else _ORDINALS[m.group(2).lower()]
            if k > images:
                fail(f"{field} refers to {m.group(0)!r}, but image_{k} is empty (the row has {images} image(s))")


def check_unique_idx(ds, task: str, split: str) -> None:
    """A duplicate idx in one split (two rows scored, submitted and reported as one) is a DataError naming it.
    Reads the idx column only: no image is decoded."""
    seen: dict = {}
    for i, idx in enumerate(ds["idx"]):
        if idx in seen and idx not in (None, ""):
            raise DataError(f"{task}/{split} idx={idx}: duplicate idx (rows {seen[idx]} and {i})")
        seen.setdefault(idx, i)


def validate_dataset(ds, task: str, split: str) -> None:
    """Validate a `datasets.Dataset`: idx unique, then every row (images checked from their raw bytes)."""
    from datasets import Image

    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise DataError(f"{task}/{split}: missing column(s) {', '.join(missing)} (BLINK columns: {', '.join(COLUMNS)})")
    check_unique_idx(ds, task, split)
    raw = ds
    for c in IMAGE_COLUMNS:
        if c in raw.column_names and isinstance(raw.features[c], Image):
            raw = raw.cast_column(c, Image(decode=False))
    for i, row in enumerate(raw):
        validate_row(row, task, split, position=i)


def _read_parquet(files: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    tables = [pq.read_table(f) for f in files]
    return Dataset(pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0])


def _load_local(task: str, split: str, root: str):
    from datasets import load_from_disk

    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"{task}/{split}: data source {root!r} is neither 'hub' nor a directory")
    for base in (os.path.join(root, task), root):
        if os.path.isfile(os.path.join(base, "dataset_dict.json")):
            dd = load_from_disk(base)
            if split not in dd:
                raise DataError(f"{task}/{split}: split {split!r} not in {base} (splits: {', '.join(dd)})")
            return dd[split]
        if os.path.isfile(os.path.join(base, split, "state.json")):
            return load_from_disk(os.path.join(base, split))
        for pattern in (f"{split}.parquet", f"{split}-*.parquet", os.path.join(split, "*.parquet")):
            files = sorted(glob.glob(os.path.join(glob.escape(base), pattern)))
            if files:
                return _read_parquet(files)
    raise DataError(f"{task}/{split}: no data in {root}: looked for a save_to_disk DatasetDict or Dataset and "
                    f"for {split}.parquet, {split}-*.parquet, {split}/*.parquet in {root}/{task} and {root}")


def _normalise(ds, task: str):
    """Image columns as datasets.Image (adding absent image_2..4 as empty); absent text columns added."""
    from datasets import Image, Value

    for c in IMAGE_COLUMNS:
        if c not in ds.column_names:
            ds = ds.add_column(c, [None] * len(ds), feature=Image())
        elif not isinstance(ds.features[c], Image):
            try:
                ds = ds.cast_column(c, Image())
            except Exception as e:
                raise DataError(f"{task}: column {c} is not an image column ({ds.features[c]}): {e}") from e
    defaults = {"prompt": "", "explanation": "", "sub_task": task}
    for c, v in defaults.items():
        if c not in ds.column_names:
            ds = ds.add_column(c, [v] * len(ds), feature=Value("string"))
    return ds


def load_blink(task: str, split: str, source: str = "hub", *, hub_id: str = "BLINK-Benchmark/BLINK",
               limit: int | None = None, validate: bool = True):
    """One BLINK task split as a `datasets.Dataset`.

    source="hub": `datasets.load_dataset(hub_id, task, split=split)`. Otherwise a local directory holding
    a save_to_disk DatasetDict (at source/<task> or source), a save_to_disk Dataset per split
    (source/<task>/<split>), or parquet (source/<task>/<split>.parquet, <split>-*.parquet, <split>/*.parquet,
    or the same directly under source). limit: keep the first `limit` rows (None or 0: all).
    Every row is checked with `validate_row` unless validate=False."""
    check_task(task, BLINK_TASKS)
    if limit is not None and limit < 0:
        raise DataError(f"{task}/{split}: limit must be >= 0, got {limit}")
    if source == "hub":
        import datasets

        ds = datasets.load_dataset(hub_id, task, split=split)
    else:
        ds = _load_local(task, split, source)
    if validate:
        missing = [c for c in REQUIRED if c not in ds.column_names]
        if missing:
            raise DataError(f"{task}/{split}: missing column(s) {', '.join(missing)} (BLINK columns: {', '.join(COLUMNS)})")
    ds = _normalise(ds, task)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    if validate:
        validate_dataset(ds, task, split)
    return ds
