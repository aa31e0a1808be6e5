"""Visual_Similarity from NIGHTS (DreamSim; paper Appendix A.9), in BLINK's format: the reference and its
two distortions, the one the human votes prefer correct; 2-way.

Layout: the official nights.zip, SRC/data.csv (or SRC/nights/data.csv, as the zip unpacks) with SRC/ref/<xxx>/<yyy>.png and SRC/distort/<xxx>/<yyy>_{0,1}.png.
Columns: split (train/val/test: our splits follow it) and votes by name, as DreamSim's TwoAFCDataset reads
them; ref_path, left_path, right_path by name, else the 5th-7th columns, and the preference from right_vote,
else the 3rd column, as that loader reads them by position (p = the share of votes for right_path). Like DreamSim, triplets with votes < 6 are dropped; ties are too."""

from __future__ import annotations

import csv
import os

from livr.data.build.common import SourceError, open_image, phash_file

TEXT = ("Given three similar but different images, take the first image as reference. Can you tell which one of "
        "the latter two images is most similar to the first one?")
QUESTION = "Which image is most similar to the reference image?"
MIN_VOTES = 6


def scan(source: str) -> dict:
    if not os.path.isfile(os.path.join(source, "data.csv")) and os.path.isdir(os.path.join(source, "nights")):
        source = os.path.join(source, "nights")
    path = os.path.join(source, "data.csv")
    if not os.path.isfile(path):
        raise SourceError(f"Visual_Similarity: {path}: missing annotation file (NIGHTS data.csv)")
    pools: dict = {"train": [], "val": [], "test": []}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        col = {c: header.index(c) for c in header}
        for name, pos in (("ref_path", 4), ("left_path", 5), ("right_path", 6)):  # DreamSim reads them by position
            if name not in col and len(header) > pos:
                col[name] = pos
        need = [c for c in ("ref_path", "left_path", "right_path", "split") if c not in col]
        if need:
            raise SourceError(f"Visual_Similarity: {path}: missing column(s) {', '.join(need)}")
        pref = col.get("right_vote", 2)
        for line, r in enumerate(reader, start=2):
            if len(r) < len(header):
                raise SourceError(f"Visual_Similarity: {path}:{line}: {len(r)} fields, the header has {len(header)}")
            split = r[col["split"]]
            try:
                p = float(r[pref])
                votes = float(r[col["votes"]]) if "votes" in col else MIN_VOTES
            except ValueError:
                raise SourceError(f"Visual_Similarity: {path}:{line}: non-numeric vote {r[pref]!r}") from None
            if split not in pools or votes < MIN_VOTES or p == 0.5:
                continue
            ref, left, right = (r[col[c]] for c in ("ref_path", "left_path", "right_path"))
            key = r[col["id"]] if "id" in col else ref
            pools[split].append({"key": f"{split}:{key}:{line}", "group": ref, "images": [ref, left, right],
                                 "paths": [os.path.join(source, x) for x in (ref, left, right)],
                                 "right_preferred": p > 0.5})
    return pools


def prepare(unit: dict, rng, ctx) -> dict:
    for p in unit["paths"]:
        open_image(p)  # Skip if missing or unreadable
    ref, left, right = unit["paths"]
    best, worst = (right, left) if unit["right_preferred"] else (left, right)
    return {"paths": [ref, best, worst], "images": unit["images"],
            "hashes": [phash_file(p) for p in unit["paths"]], "sources": list(unit["paths"]), "prov": {"files": [ref, best, worst]}}


def render(sample: dict, label: int) -> dict:
    ref, best, worst = (open_image(p) for p in sample["paths"])
    cands = [best, worst] if label == 0 else [worst, best]
    return {"images": [ref, *cands], "question": QUESTION, "text": TEXT,
            "choices": ["the second image", "the third image"], "answer": label}


SIMILARITY = {"scan": scan, "prepare": prepare, "render": render, "labels": 2,
              "prompt": {"blank": True, "end": "\n"}, "dedup": "image",
              "splits": {"train": "train", "val": "val", "test": "test"}}
