"""Shared machinery of the training-set builders: errors, seeded randomness, group-disjoint splits, balanced
labels, perceptual hashes, BLINK-style markers and prompts, and the atomic, streaming parquet writer.

A builder (one per task, see livr.data.build) is a dict of plain functions:
  scan(source) -> {pool: [unit, ...]}    lightweight units (ids, paths, annotations; never pixels)
  prepare(unit, rng, ctx) -> sample       validate/choose geometry; json-able, holds pHashes not pixels;
                                          raises Skip(reason) for a unit that cannot give a row
  render(sample, label) -> out            draw the row: {"images", "question", "text", "choices", "answer"}
and settings: splits {split: pool}, labels (how many answer classes to balance), rounds (passes over the
units; > 1 where one unit gives several rows), fractions (optional group split fractions per pool).
A unit has "key" (unique), "group" (what the splits keep disjoint: image, sequence, pair, triplet) and
"images" (source image ids; the driver also keeps these disjoint across splits); optional "stratum"."""

from __future__ import annotations

import functools
import io
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from livr.data.images import aspect_problem, image_problem, is_bomb, refuse_bombs
from livr.data.prompts import choice_letters
from livr.data.tasks import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".webp", ".bmp", ".tif", ".tiff", ".gif")
RED, BLUE, WHITE = (255, 0, 0), (0, 90, 255), (255, 255, 255)
PHASH_MAX_DISTANCE = 8  # of 64 bits: re-encoded/resized copies stay within ~4, unrelated images are ~32 apart


class SourceError(DataError):
    """A source that cannot be built from: one line naming the file and what is wrong."""


class Skip(Exception):
    """A unit that gives no row (unreadable image, box outside the image, ...): counted by `kind`, not fatal."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def crc(text: str) -> int:
    return zlib.crc32(text.encode())


def rng_for(seed: int, *parts) -> np.random.Generator:
    """A generator that depends only on seed and the given strings/ints (not on order or worker)."""
    key = tuple(p if isinstance(p, int) else crc(str(p)) for p in parts)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def balanced_label(seed: int, task: str, split: str, i: int, k: int, weights=None) -> int:
    """Row i's answer class: each block of k rows holds every class once, in a seeded order; with weights
    (one int per class), each block of sum(weights) rows holds class c weights[c] times."""
    pattern = [c for c in range(k) for _ in range(weights[c])] if weights else list(range(k))
    n = len(pattern)
    return int(pattern[rng_for(seed, task, split, "labels", i // n).permutation(n)[i % n]])


# --------------------------------------------------------------------------------------------- images
def open_image(path: str) -> Image.Image:
    """The file as an RGB image; Skip (counted by the driver) if it is missing, cannot be decoded, or is refused
    from its header (a decompression bomb, an absurd size, an extreme aspect ratio: livr.data.images)."""
    try:
        with refuse_bombs(), Image.open(path) as im:
            _check_header(path, im.size)
            im.load()
            return im.convert("RGB")
    except Skip:
        raise
    except FileNotFoundError:
        raise Skip("missing image", path) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types
        if is_bomb(e):
            raise Skip("oversized image", f"{path} {image_problem(e)}") from None
        raise Skip("unreadable image", f"{path} ({type(e).__name__})") from None


def _check_header(path: str, size: tuple[int, int]) -> None:
    problem = aspect_problem(size)
    if problem:
        raise Skip("extreme aspect ratio", f"{path} {problem}")


@functools.lru_cache(maxsize=65536)
def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header; Skip if missing, not an image or refused from its header (pixels
    are checked when hashed: phash_file decodes the whole file)."""
    try:
        with refuse_bombs(), Image.open(path) as im:
            _check_header(path, im.size)
            return im.size
    except Skip:
        raise
    except FileNotFoundError:
        raise Skip("missing image", path) from None
    except Exception as e:  # noqa: BLE001
        if is_bomb(e):
            raise Skip("oversized image", f"{path} {image_problem(e)}") from None
        raise Skip("unreadable image", f"{path} ({type(e).__name__})") from None


def phash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (imagehash.phash) as an int."""
    import imagehash

    return int(str(imagehash.phash(img)), 16)


@functools.lru_cache(maxsize=65536)
def phash_file(path: str) -> int:
    return phash(open_image(path))


def near_duplicate(hashes, table: np.ndarray, max_distance: int = PHASH_MAX_DISTANCE) -> bool:
    """True if any hash is within max_distance bits of an excluded one."""
    if table.size == 0:
        return False
    for h in hashes:
        x = np.bitwise_xor(table, np.uint64(h))
        bits = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        if int(bits.min()) <= max_distance:
            return True
    return False


# --------------------------------------------------------------------------------------------- markers
@functools.lru_cache(maxsize=32)
def font(px: int):
    return ImageFont.load_default(size=max(10, int(px)))


def marker_scale(img: Image.Image) -> float:
    """Marker sizes follow the image (BLINK's markers are legible at any resolution): ~1/40 of the long side."""
    return max(img.size) / 40.0


def draw_point(draw: ImageDraw.ImageDraw, xy, label: str, scale: float, colour=RED) -> None:
    """BLINK's point marker: a circle around the point, its label beside it on a white tag."""
    x, y = xy
    r, w = max(4.0, scale * 0.6), max(2, round(scale / 6))
    draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=w)
    f = font(max(10, round(scale * 1.1)))
    tx, ty = x + r + 2, y - r - 2
    box = draw.textbbox((tx, ty), label, font=f)
    W = draw.im.size[0]
    if box[2] > W:  # keep the tag inside the image
        tx -= (box[2] - box[0]) + 2 * r + 4
    if box[1] < 0:
        ty = y + r
    box = draw.textbbox((tx, ty), label, font=f)
    draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill=WHITE)
    draw.text((tx, ty), label, fill=colour, font=f)


def draw_box(draw: ImageDraw.ImageDraw, box, label: str, scale: float, colour) -> None:
    """A labelled bounding box: outline, and its label on a tag at the top-left corner."""
    w = max(2, round(scale / 5))
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, x1, y1], outline=colour, width=w)
    f = font(max(10, round(scale * 1.1)))
    ty = y0 - f.size - 4 if y0 - f.size - 4 >= 0 else y0 + w
    bb = draw.textbbox((x0 + w, ty), label, font=f)
    draw.rectangle([bb[0] - 2, bb[1] - 1, bb[2] + 2, bb[3] + 1], fill=colour)
    draw.text((x0 + w, ty), label, fill=WHITE, font=f)


def far_points(rng, n: int, w: float, h: float, margin: float, min_dist: float, avoid=(), tries: int = 400):
    """n points inside [margin, w-margin] x [margin, h-margin], each min_dist from the others and from
    `avoid`; Skip if they do not fit."""
    pts = []
    for _ in range(tries):
        if len(pts) == n:
            break
        p = (float(rng.uniform(margin, w - margin)), float(rng.uniform(margin, h - margin)))
        if all(np.hypot(p[0] - q[0], p[1] - q[1]) >= min_dist for q in [*avoid, *pts]):
            pts.append(p)
    if len(pts) < n:
        raise Skip("no room for distractor points")
    return pts


# --------------------------------------------------------------------------------------------- prompts
def prompt(text: str, choices, select: str = "choices", sep: str = "\n", blank: bool = False, end: str = "") -> str:
    """BLINK's full prompt: the instruction; `sep` (a newline, or a space: the select line on the question's own
    line); "Select from the following {select}."; a blank line if `blank`; one '(X) choice' line per choice;
    then `end` (BLINK's Jigsaw, Art_Style and Semantic_Correspondence prompts end with a newline). Each builder's
    spec["prompt"] holds its task's layout (docs/data.md says what each rests on)."""
    lines = [f"({l}) {c}" for l, c in zip(choice_letters(len(choices)), choices)]
    head = f"{text}{sep}Select from the following {select}." + ("\n" if blank else "")
    return "\n".join([head, *lines]) + end


def encode_png(img: Image.Image) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}
