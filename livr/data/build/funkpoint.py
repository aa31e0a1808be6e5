"""Functional_Correspondence from FunKPoint (paper Appendix A.7), in BLINK's format.

Layout: FunKPoint's release (SRC, or SRC/FunKPoint): labels.csv, one row per (image, action), with columns
p1_x, p1_y, ..., p5_x, p5_y (the five functional keypoints, normalised to [0, 1]), difficulty, image_path
(relative to the csv's folder, images/<wnid>/<file>.jpg), action, wnid, object_category. Images are split
80/10/10 (each image in one split, with all its actions; stratified by action), then paired within their split
and action, each image used once per action (shuffled, consecutive pairs); the first of a pair is the source:
REF at keypoint k, candidates k and three other keypoints on the target."""

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


def labels_path(source: str) -> str:
    for d in (source, os.path.join(source, "FunKPoint")):
        if os.path.isfile(os.path.join(d, "labels.csv")):
            return os.path.join(d, "labels.csv")
    raise SourceError(f"Functional_Correspondence: {os.path.join(source, 'labels.csv')}: missing annotation file "
                      f"(FunKPoint's labels.csv; see `livr data build --list`)")


def scan(source: str) -> dict:
    path = labels_path(source)
    root = os.path.dirname(path)
    units = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = cols
        miss = [c for c in ("action", "image_path", *KP) if c not in cols]
        if miss:
            raise SourceError(f"Functional_Correspondence: {path}: missing column(s) {', '.join(miss)}")
        for line, r in enumerate(reader, start=2):
            try:
                kps = [(float(r[f"p{i}_x"]), float(r[f"p{i}_y"])) for i in range(1, 6)]
            except (TypeError, ValueError):
                raise SourceError(f"Functional_Correspondence: {path}:{line}: non-numeric keypoint "
                                  f"(p1_x..p5_y)") from None
            rel, action = (r["image_path"] or "").strip(), (r["action"] or "").strip()
            if not rel or not action:
                raise SourceError(f"Functional_Correspondence: {path}:{line}: empty image_path or action")
            units.append({"key": f"{rel}|{action}", "group": rel, "images": [rel], "action": action,
                          "path": os.path.join(root, rel), "kps": kps, "line": line})
    first: dict = {}  # an image's stratum: its first action (sorted), so all its rows go to one split
    for u in units:
        first[u["group"]] = min(first.get(u["group"], u["action"]), u["action"])
    for u in units:
        u["stratum"] = first[u["group"]]
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
            raise Skip("keypoint outside the image", f"{u['path']} (labels.csv line {u['line']})")
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
            "hashes": hashes, "sources": [s["path"], t["path"]],
            "prov": {"files": [s["path"], t["path"]], "action": unit["action"], "keypoint": k + 1, "ref": src_pts[k], "true": true}}


def render(sample: dict, label: int) -> dict:
    src, trg, cands = render_points(sample["src"], sample["trg"], sample["ref"], sample["true"],
                                    sample["distractors"], label)
    a = sample["action"]
    return {"images": [src, trg], "question": QUESTION.format(action=a), "text": TEXT.format(action=a),
            "choices": POINT_CHOICES, "answer": label, "prov": {"candidates": cands}}


FUNCTIONAL = {"scan": scan, "prepare": prepare, "render": render, "regroup": pair_up, "labels": 4,
              "splits": {"train": "all", "val": "all", "test": "all"},
              "fractions": {"train": 0.8, "val": 0.1, "test": 0.1}}
