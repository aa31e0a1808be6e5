"""Encoded lengths of rows without encoding them, and length-grouped evaluation batches.

`prompt_lengths(rows, builder, config)`: each row's prompt length (chat template + prompt + image tokens +
latents), counted from the text's tokens and each image's token count from the family's own `image_cost`
(the processor classes' arithmetic on the image's width and height, as `livr plan` counts). Images are not
decoded: an Arrow table's image columns are read as bytes (`decode=False`) and PIL reads the size from the
header. `grouped_batches` orders a split by that length (longest first) so that each generation batch holds
rows of similar length and its prefill computes less padding.
"""
from __future__ import annotations

import io

from PIL import Image

IMAGE_COLUMNS = tuple(f"image_{i}" for i in range(1, 5))


def _size(image) -> tuple[int, int]:
    """(width, height) of a PIL image, PNG/JPEG bytes, or a datasets {"bytes", "path"} record (header only)."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    with Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image) as im:
        return im.size


def _undecoded(rows):
    """Rows whose image columns come as bytes records (Arrow tables), part by part; plain rows as they are."""
    from datasets import Image as ImageFeature

    for part in getattr(rows, "parts", [rows]):
        cols = [c for c in IMAGE_COLUMNS if c in getattr(part, "column_names", ())]
        if cols:
            for c in cols:
                part = part.cast_column(c, ImageFeature(decode=False))
        yield from part


def prompt_lengths(rows, builder, config) -> list[int]:
    """Each row's encoded prompt length (no answer), estimated without running the image processor."""
    fam, tok = builder.family, builder.tokenizer
    probe = {"family": fam, "image_processor": builder.processor.image_processor, "tokenizer": tok,
             "config": config, "processor": builder.processor}
    out = []
    for row in _undecoded(rows):
        sizes = [_size(row[c]) for c in IMAGE_COLUMNS if row.get(c) is not None]
        ids = tok(builder.prompt_text(row), add_special_tokens=False)["input_ids"]
        text = len(ids) - sum(i == builder.image_id for i in ids)
        out.append(text + sum(fam.image_cost(probe, w, h, len(sizes))[0] for w, h in sizes))
    return out


def grouped_batches(lengths: list[int], batch_size: int, rank: int = 0, world: int = 1) -> tuple[list, list]:
    """(batches, scored) of this rank: the rows ordered by length (longest first, ties in row order), cut into
    global chunks of batch_size × world rows, rank r taking the r-th run of batch_size rows of every chunk. Every
    rank gets the same number of batches; a rank out of rows runs a dummy batch (row 0, not scored)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunk = batch_size * world
    batches, scored = [], []
    for start in range(0, len(order), chunk):
        mine = order[start + rank * batch_size: start + (rank + 1) * batch_size]
        batches.append(mine or [0])
        scored.append(len(mine))
    return batches, scored


def pad_fraction(batches: list[list[int]], scored: list[int], lengths: list[int]) -> float:
    """The share of the prefill's positions that are padding, over the scored rows of `batches`."""
    real = padded = 0
    for b, n in zip(batches, scored):
        rows = [lengths[i] for i in b[:n]]
        if rows:
            real += sum(rows)
            padded += max(rows) * len(rows)
    return 1 - real / padded if padded else 0.0
