"""Semantic_Correspondence from SPair-71k (paper Appendix A.6), in BLINK's format.

Layout: the official SPair-71k release: SRC/PairAnnotation/{trn,val,test}/<pair>.json (keys src_imname,
trg_imname, category, src_kps, trg_kps: [[x, y], ...] matched by position) and SRC/JPEGImages/<category>/
<imname>. Pairs with at least four valid correspondences (finite, non-negative, inside both images) are used;
REF is one source keypoint, the candidates its annotated match and three other annotated target keypoints.
Train and val both come from SPair's trn, as in the paper, with no image (hence no pair) in both: each trn
image goes to val with probability 1/3 (by a hash of <category>/<image name>, so every build agrees), a pair
joins the split of its two images, and the ~4/9 of pairs whose images fall in different splits are not used
(1/9 of the pairs are val-only, 4/9 train-only: the paper's 1,000 : 250). Test comes from SPair's test; SPair's
val is not used."""

from __future__ import annotations

import json
import math
import os

from livr.data.build.common import Skip, SourceError, crc, image_size, phash_file
from livr.data.build.points import POINT_CHOICES, render_points

TEXT = ("Humans can find corresponding points for different objects in the same category. For instance, if there "
        "are images of two different cats, then the left ear tip of one cat corresponds to the left ear tip of the "
        "other cat, and the right front paw of one cat corresponds to the right front paw of the other cat.\n"
        "Given the following two images, a reference point is annotated on the first image, labeled with REF. You "
        "are given multiple red-circled points on the second image, choices of \"A, B, C, D\" are drawn beside "
        "each circle. Select between the choices on the second image and find the corresponding point for the "
        "reference point. Which point is corresponding to the reference point?")
QUESTION = "Which point is corresponding to the reference point?"
POOLS = ("trn", "test")
VAL_SHARE = 3  # 1 in VAL_SHARE trn images goes to val
KEYS = ("src_imname", "trg_imname", "category", "src_kps", "trg_kps")


def _root(source: str) -> str:
    inner = os.path.join(source, "SPair-71k")
    return inner if os.path.isdir(os.path.join(inner, "PairAnnotation")) else source


def pair_images(path: str, name: str) -> list[str]:
    """['<category>/<src image>', '<category>/<trg image>'] from the file name (<id>-<src>-<trg>:<category>.json,
    as SPair names them), else from the json."""
    stem, _, cat = name[: -len(".json")].partition(":")
    parts = stem.split("-")
    if cat and len(parts) == 3:
        return [f"{cat}/{parts[1]}.jpg", f"{cat}/{parts[2]}.jpg"]
    return read_pair(path, "")["images"]


def scan(source: str) -> dict:
    source = _root(source)
    pools: dict = {"trn_train": [], "trn_val": [], "test": []}
    for pool in POOLS:
        d = os.path.join(source, "PairAnnotation", pool)
        if not os.path.isdir(d):
            raise SourceError(f"Semantic_Correspondence: {d}: missing (SPair-71k PairAnnotation/{pool}/*.json)")
        for n in sorted(x for x in os.listdir(d) if x.endswith(".json")):
            u = {"key": f"{pool}/{n}", "group": f"{pool}/{n}", "ann": os.path.join(d, n), "root": source,
                 "images": []}
            if pool == "test":
                pools["test"].append(u)
                continue
            side = {crc(i) % VAL_SHARE == 0 for i in pair_images(u["ann"], n)}
            if len(side) == 1:  # both images on one side
                pools["trn_val" if side.pop() else "trn_train"].append(u)
    return pools


def _valid(p, w: int, h: int) -> bool:
    return (isinstance(p, (list, tuple)) and len(p) >= 2 and all(isinstance(v, (int, float)) for v in p[:2])
            and all(math.isfinite(v) for v in p[:2]) and 0 <= p[0] <= w - 1 and 0 <= p[1] <= h - 1)


def read_pair(path: str, source: str) -> dict:
    """One PairAnnotation json: image paths, image ids and the keypoint lists (a SourceError if malformed)."""
    try:
        with open(path) as f:
            a = json.load(f)
    except (OSError, ValueError) as e:
        raise SourceError(f"Semantic_Correspondence: {path}: not a pair annotation json ({e})") from None
    miss = [k for k in KEYS if k not in a]
    if miss:
        raise SourceError(f"Semantic_Correspondence: {path}: missing key(s) {', '.join(miss)}")
    cat = a["category"]
    return {"images": [f"{cat}/{a['src_imname']}", f"{cat}/{a['trg_imname']}"],
            "src": os.path.join(source, "JPEGImages", cat, a["src_imname"]),
            "trg": os.path.join(source, "JPEGImages", cat, a["trg_imname"]),
            "src_kps": a["src_kps"] or [], "trg_kps": a["trg_kps"] or []}


def prepare(unit: dict, rng, ctx) -> dict:
    unit = {**unit, **read_pair(unit["ann"], unit["root"])}
    hashes = [phash_file(unit["src"]), phash_file(unit["trg"])]  # Skip if unreadable
    (w1, h1), (w2, h2) = image_size(unit["src"]), image_size(unit["trg"])
    pairs = [(s, t) for s, t in zip(unit["src_kps"], unit["trg_kps"]) if _valid(s, w1, h1) and _valid(t, w2, h2)]
    if len(pairs) < 4:
        raise Skip("fewer than 4 valid keypoints", unit["ann"])
    k = int(rng.integers(len(pairs)))
    ref, true = pairs[k]
    gap = max(w2, h2) / 40  # distractors must not sit on the true point (two keypoints can nearly coincide)
    rest = [t for j, (_, t) in enumerate(pairs) if j != k and math.dist(t[:2], true[:2]) > gap]
    if len(rest) < 3:
        raise Skip("fewer than 3 distinct distractor keypoints", unit["ann"])
    dists = [rest[j][:2] for j in rng.permutation(len(rest))[:3]]
    return {"src": unit["src"], "trg": unit["trg"], "ref": ref[:2], "true": true[:2], "distractors": dists,
            "images": unit["images"], "hashes": hashes, "sources": [unit["src"], unit["trg"]],
            "prov": {"files": [unit["src"], unit["trg"], unit["ann"]], "ref": ref[:2], "true": true[:2]}}


def render(sample: dict, label: int) -> dict:
    src, trg, cands = render_points(sample["src"], sample["trg"], sample["ref"], sample["true"],
                                    sample["distractors"], label)
    return {"images": [src, trg], "question": QUESTION, "text": TEXT, "choices": POINT_CHOICES, "answer": label,
            "prov": {"candidates": cands}}


SEMANTIC = {"scan": scan, "prepare": prepare, "render": render, "labels": 4, "prompt": {"end": "\n"},
            "dedup": "pair",
            "splits": {"train": "trn_train", "val": "trn_val", "test": "test"}}
