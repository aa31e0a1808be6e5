"""Art_Style from ArtBench-10 (paper Appendix A.5), in BLINK's format: a reference painting and two
candidates, one of the reference's style (a different painting) and one of another style; 2-way.

Layout: the official 256x256 ImageFolder release, SRC/{train,test}/<style>/*.jpg (or, as the tar unpacks,
SRC/artbench-10-imagefolder-split/{train,test}/...). Images are split first
(train and val from ArtBench's train, test from its test), and a row only uses images of its own split."""

from __future__ import annotations

import os

from livr.data.build.common import IMAGE_EXTS, Skip, SourceError, open_image, phash_file

TEXT = ("Some most common art painting styles include Realism, Impressionism, Expressionism, Pop Art, and Cubism. "
        "Given the following images of art paintings, use the first image as the reference image, and determine "
        "which one of the second or the third image shares the same style as the reference image?")
QUESTION = "Which image shares the same style as the reference image?"


def scan(source: str) -> dict:
    inner = os.path.join(source, "artbench-10-imagefolder-split")
    source = inner if os.path.isdir(inner) else source
    pools = {}
    for pool in ("train", "test"):
        d = os.path.join(source, pool)
        if not os.path.isdir(d):
            raise SourceError(f"Art_Style: {d}: missing (ArtBench-10 ImageFolder: {pool}/<style>/*.jpg)")
        styles = sorted(e.name for e in os.scandir(d) if e.is_dir())
        if len(styles) < 2:
            raise SourceError(f"Art_Style: {d}: needs at least two style folders, found {len(styles)}")
        units = []
        for style in styles:
            for n in sorted(os.listdir(os.path.join(d, style))):
                if n.lower().endswith(IMAGE_EXTS):
                    key = f"{pool}/{style}/{n}"
                    units.append({"key": key, "group": key, "images": [key], "style": style,
                                  "path": os.path.join(d, style, n), "stratum": style})
        pools[pool] = units
    return pools


def context(units: list) -> dict:
    """The split's own images by style: candidates come only from the row's split."""
    by_style: dict = {}
    for u in units:
        by_style.setdefault(u["style"], []).append(u)
    return by_style


def prepare(unit: dict, rng, ctx: dict) -> dict:
    same = [u for u in ctx[unit["style"]] if u["key"] != unit["key"]]
    styles = [s for s in sorted(ctx) if s != unit["style"]]
    if not same or not styles:
        raise Skip("no candidate of the same or of another style in this split", unit["path"])
    pos = same[int(rng.integers(len(same)))]
    other = ctx[styles[int(rng.integers(len(styles)))]]
    neg = other[int(rng.integers(len(other)))]
    for u in (unit, pos, neg):
        open_image(u["path"])  # Skip if unreadable
    units = [unit, pos, neg]
    return {"paths": [u["path"] for u in units], "images": [u["key"] for u in units],
            "hashes": [phash_file(u["path"]) for u in units], "sources": [u["path"] for u in units],
            "prov": {"files": [u["path"] for u in units], "styles": [u["style"] for u in units]}}


def render(sample: dict, label: int) -> dict:
    ref, pos, neg = (open_image(p) for p in sample["paths"])
    cands = [pos, neg] if label == 0 else [neg, pos]
    return {"images": [ref, *cands], "question": QUESTION, "text": TEXT,
            "choices": ["the second image", "the third image"], "answer": label}


ART_STYLE = {"scan": scan, "prepare": prepare, "render": render, "context": context, "labels": 2,
             "prompt": {"end": "\n"}, "dedup": "image",
             "splits": {"train": "train", "val": "train", "test": "test"}}
