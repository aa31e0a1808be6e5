"""Visual_Correspondence from HPatches sequences (paper Appendix A.4), in BLINK's format.

Layout: the official hpatches-sequences-release (SRC, or SRC/hpatches-sequences-release): one folder per
sequence, v_* (viewpoint) and i_* (illumination), holding 1.ppm ... 6.ppm and H_1_2 ... H_1_6 (3x3 homographies
from image 1, as text). Sequences are split 80/10/10 into train/val/test, viewpoint and illumination
separately; within a sequence every forward pair (i, j) with j - i >= 2 is used, H_i_j = H_1_j H_1_i^-1.
Each pass over the pairs (up to ROUNDS) samples a new reference point, away from the border, whose
homography image lies inside the target; three distractors are far from it and from each other."""

from __future__ import annotations

import os

import numpy as np

from livr.data.build.common import Skip, SourceError, far_points, image_size, phash_file
from livr.data.build.points import POINT_CHOICES, render_points

TEXT = ("A point is circled on the first image, labeled with REF. We change the camera position or lighting and "
        "shoot the second image. You are given multiple red-circled points on the second image, choices of "
        "\"A, B, C, D\" are drawn beside each circle. Which point on the second image corresponds to the point "
        "in the first image?")
QUESTION = "Which point on the second image corresponds to the point in the first image?"
PAIRS = [(i, j) for i in range(1, 7) for j in range(i + 2, 7)]
ROUNDS = 8


def _root(source: str) -> str:
    inner = os.path.join(source, "hpatches-sequences-release")
    return inner if os.path.isdir(inner) else source


def scan(source: str) -> dict:
    root = _root(source)
    seqs = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[:2] in ("v_", "i_"))
    if not seqs:
        raise SourceError(f"Visual_Correspondence: {root}: no v_*/i_* sequence folders (hpatches-sequences-release)")
    units = []
    for s in seqs:
        d = os.path.join(root, s)
        for i, j in PAIRS:
            units.append({"key": f"{s}:{i}-{j}", "group": s, "stratum": s[0], "seq": d, "pair": [i, j],
                          "images": [f"{s}/{i}", f"{s}/{j}"]})
    return {"all": units}


def homography(seq: str, k: int) -> np.ndarray:
    """H_1_k (identity for k = 1); Skip if the file is missing or not a 3x3 matrix."""
    if k == 1:
        return np.eye(3)
    path = os.path.join(seq, f"H_1_{k}")
    try:
        H = np.loadtxt(path, dtype=float)
    except (OSError, ValueError) as e:
        raise Skip("bad homography file", f"{path} ({type(e).__name__})") from None
    if H.shape != (3, 3) or not np.isfinite(H).all() or abs(np.linalg.det(H)) < 1e-12:
        raise Skip("bad homography file", f"{path} (not an invertible 3x3 matrix)")
    return H


def warp(H: np.ndarray, p) -> tuple[float, float]:
    v = H @ np.array([p[0], p[1], 1.0])
    return float(v[0] / v[2]), float(v[1] / v[2])


def _image(seq: str, k: int) -> str:
    for ext in (".ppm", ".png", ".jpg"):
        p = os.path.join(seq, f"{k}{ext}")
        if os.path.isfile(p):
            return p
    return os.path.join(seq, f"{k}.ppm")


def prepare(unit: dict, rng, ctx) -> dict:
    seq, (i, j) = unit["seq"], unit["pair"]
    H = homography(seq, j) @ np.linalg.inv(homography(seq, i))
    src_p, trg_p = _image(seq, i), _image(seq, j)
    hashes = [phash_file(src_p), phash_file(trg_p)]  # decodes both (Skip if unreadable), once per image
    (w1, h1), (w2, h2) = image_size(src_p), image_size(trg_p)
    for _ in range(100):
        ref = (float(rng.uniform(0.1 * w1, 0.9 * w1)), float(rng.uniform(0.1 * h1, 0.9 * h1)))
        true = warp(H, ref)
        if 0.08 * w2 <= true[0] <= 0.92 * w2 and 0.08 * h2 <= true[1] <= 0.92 * h2:
            break
    else:
        raise Skip("no reference point maps inside the target", unit["key"])
    dists = far_points(rng, 3, w2, h2, 0.08 * min(w2, h2), max(w2, h2) / 8, avoid=[true])
    return {"src": src_p, "trg": trg_p, "ref": ref, "true": true, "distractors": dists, "images": unit["images"],
            "hashes": hashes, "sources": [src_p, trg_p],
            "prov": {"files": [src_p, trg_p], "ref": ref, "true": true}}


def render(sample: dict, label: int) -> dict:
    src, trg, cands = render_points(sample["src"], sample["trg"], sample["ref"], sample["true"],
                                    sample["distractors"], label)
    return {"images": [src, trg], "question": QUESTION, "text": TEXT, "choices": POINT_CHOICES, "answer": label,
            "prov": {"candidates": cands}}


CORRESPONDENCE = {"scan": scan, "prepare": prepare, "render": render, "labels": 4, "rounds": ROUNDS,
                  "prompt": {"select": "options", "sep": " "}, "dedup": "pair",
                  "splits": {"train": "all", "val": "all", "test": "all"},
                  "fractions": {"train": 0.8, "val": 0.1, "test": 0.1}}
