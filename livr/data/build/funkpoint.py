"""Functional_Correspondence from FunKPoint (paper Appendix A.7), in BLINK's format.

FunKPoint's own release layout could not be learned from public material here. The layout built against is
the one its public derivative (github.com/Qifei-C/funkpoint_curated_dataset, references.csv) quotes from it:
per image an action label and five functional keypoints normalised to [0, 1], images under
images/<wnid>/<nnnn>.<ext>. So: SRC/annotations.csv with columns action, image_path (or source_image_path;
relative to SRC), p1_x, p1_y, ..., p5_x, p5_y. Images are split 80/10/10 per action (each image in one
split), then paired within their split and action, each image used once (shuffled, consecutive pairs); the
first of a pair is the source: REF at keypoint k, candidates k and three other keypoints on the target."""

from __future__ import annotations

import csv
import math
import os

from livr.data.build.common import Skip, SourceError, image_size, phash_file
from livr.data.build.points import POINT_CHOICES, render_points

TEXT = ("Humans can find corresponding points for the same action between different objects. For instance, if a "
        "person uses a pot versus a hammer to \"Mash Pound\", then the handle of the pot will be the corresponding "
        "point to the handle of the hammer because they serve the same function for the action -- to hold; and "
        "the bottom of the pot will be the corresponding point to the face of the hammer because they both mash "
        "the other object.\nGiven the following two images, a reference point is annotated on the first image, "
        "labeled with REF. You are given multiple red-circled points on the second image, choices of \"A, B, C, "
        "D\" are drawn beside each circle. Select between the choices on the second image and find the "
        "corresponding point for the reference point, if we use both items for the action: \"{action}\". Which "
        "point is corresponding to the reference point?")
QUESTION = "For the action \"{action}\", which point is corresponding to the reference point?"
KP = [f"p{i}_{a}" for i in range(1, 6) for a in ("x", "y")]


def scan(source: str) -> dict:
    path = os.path.join(source, "annotations.csv")
    if not os.path.isfile(path):
        raise SourceError(f"Functional_Correspondence: {path}: missing annotation file (see `livr data build --list`)")
    units = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        img_col = "image_path" if "image_path" in cols else "source_image_path"
        miss = [c for c in ("action", img_col, *KP) if c not in cols]
        if miss:
            raise SourceError(f"Functional_Correspondence: {path}: missing column(s) {', '.join(miss)}")
        for line, r in enumerate(reader, start=2):
            try:
                kps = [(float(r[f"p{i}_x"]), float(r[f"p{i}_y"])) for i in range(1, 6)]
            except (TypeError, ValueError):
                raise SourceError(f"Functional_Correspondence: {path}:{line}: non-numeric keypoint") from None
            rel = r[img_col]
            units.append({"key": f"{rel}|{r['action']}", "group": rel, "stratum": r["action"], "images": [rel],
                          "action": r["action"], "path": os.path.join(source, rel), "kps": kps, "line": line})
    return {"all": units}


def pair_up(units: list, rng) -> list:
    """Within a split: per action, shuffle the images and pair them consecutively (each image used once)."""
    by_action: dict = {}
    for u in sorted(units, key=lambda u: u["key"]):
        by_action.setdefault(u["action"], []).append(u)
    pairs = []
    for action in sorted(by_action):
        us = [by_action[action][j] for j in rng.permutation(len(by_action[action]))]
        for a, b in zip(us[0::2], us[1::2]):
            pairs.append({"key": f"{a['key']}>{b['key']}", "group": a["group"], "images": a["images"] + b["images"],
                          "action": action, "src": a, "trg": b})
    return [pairs[j] for j in rng.permutation(len(pairs))]


def _pixels(u: dict, size) -> list:
    w, h = size
    pts = []
    for x, y in u["kps"]:
        if not (math.isfinite(x) and math.isfinite(y) and 0 <= x <= 1 and 0 <= y <= 1):
            raise Skip("keypoint outside the image", f"{u['path']} (annotations.csv line {u['line']})")
        pts.append((x * (w - 1), y * (h - 1)))
    return pts


def prepare(unit: dict, rng, ctx) -> dict:
    s, t = unit["src"], unit["trg"]
    hashes = [phash_file(s["path"]), phash_file(t["path"])]  # Skip if unreadable
    src_pts, trg_pts = _pixels(s, image_size(s["path"])), _pixels(t, image_size(t["path"]))
    k = int(rng.integers(5))
    true = trg_pts[k]
    W = max(image_size(t["path"]))
    rest = [p for j, p in enumerate(trg_pts) if j != k and math.dist(p, true) > W / 40]
    if len(rest) < 3:
        raise Skip("fewer than 3 distinct distractor keypoints", t["path"])
    dists = [rest[j] for j in rng.permutation(len(rest))[:3]]
    return {"src": s["path"], "trg": t["path"], "ref": src_pts[k], "true": true, "distractors": dists,
            "action": unit["action"], "images": unit["images"],
            "hashes": hashes,
            "prov": {"files": [s["path"], t["path"]], "keypoint": k + 1, "ref": src_pts[k], "true": true}}


def render(sample: dict, label: int) -> dict:
    src, trg, cands = render_points(sample["src"], sample["trg"], sample["ref"], sample["true"],
                                    sample["distractors"], label)
    a = sample["action"]
    return {"images": [src, trg], "question": QUESTION.format(action=a), "text": TEXT.format(action=a),
            "choices": POINT_CHOICES, "answer": label, "prov": {"candidates": cands}}


FUNCTIONAL = {"scan": scan, "prepare": prepare, "render": render, "regroup": pair_up, "labels": 4,
              "splits": {"train": "all", "val": "all", "test": "all"},
              "fractions": {"train": 0.8, "val": 0.1, "test": 0.1}}
