"""Relative_Reflectance from the Multi-Illumination Dataset (MID) with its albedo (paper Appendix A.8), in
BLINK's format: two points circled and labelled A and B; "A is darker" / "B is darker" / "About the same"
when rel = |Y_A - Y_B| / max(Y_A, Y_B, 1e-8) <= 0.10 (Y: disk-averaged linear luminance of the albedo).

Layout: MID's scene folders as its zips unpack, SRC/{train,test}/<scene>/ or
SRC/multi_illumination_{train,test}_mip2_{jpg,exr}/<scene>/, each with the sRGB images dir_<k>_mip2.jpg
(k = 0..24, one per light direction) and the scene's albedo from MIDIntrinsics (compphoto/MIDIntrinsics),
extracted into the same folder: albedo.png (its --png output: linear, min-max normalised) or albedo.exr
(linear; needs OpenCV or imageio to read). Every (scene, direction) image gives rows; scenes are the groups:
train and val from MID's train scenes, test from its test scenes."""

from __future__ import annotations

import functools
import os
import re

import numpy as np
from PIL import Image, ImageDraw

from livr.data.build.common import Skip, SourceError, draw_point, image_size, marker_scale, open_image, phash_file

TEXT = ("Two points are annotated on the image, labeled by A and B. Consider the surface color of the points (the "
        "albedo of the surface, without the effect of shading). Which point has darker surface color, or the colors "
        "is about the same?")
QUESTION = "Which point has darker surface color, or the colors is about the same?"
CHOICES = ["A is darker", "B is darker", "About the same"]
SAME = 0.10
IMAGE = re.compile(r"^dir_(\d+)_mip2\.(jpg|jpeg|png)$", re.IGNORECASE)


def _pool_dir(source: str, pool: str) -> str | None:
    for name in (pool, f"multi_illumination_{pool}_mip2_jpg", f"multi_illumination_{pool}_mip2_exr"):
        d = os.path.join(source, name)
        if os.path.isdir(d):
            return d
    return None


def albedo_path(scene_dir: str) -> str | None:
    for name in ("albedo.png", "albedo.exr"):
        p = os.path.join(scene_dir, name)
        if os.path.isfile(p):
            return p
    return None


def scan(source: str) -> dict:
    pools = {}
    for pool in ("train", "test"):
        d = _pool_dir(source, pool)
        if d is None:
            raise SourceError(f"Relative_Reflectance: {os.path.join(source, pool)}: missing (MID {pool} scenes)")
        units, exr_only = [], None
        for scene in sorted(e.name for e in os.scandir(d) if e.is_dir()):
            sd = os.path.join(d, scene)
            alb = albedo_path(sd)
            names = sorted(os.listdir(sd))
            for n in names:
                m = IMAGE.match(n)
                if m:
                    units.append({"key": f"{pool}/{scene}/{n}", "group": f"{pool}/{scene}", "albedo": alb,
                                  "images": [f"{pool}/{scene}/{n}"], "path": os.path.join(sd, n)})
            if exr_only is None and "dir_0_mip2.exr" in names and not any(IMAGE.match(n) for n in names):
                exr_only = sd
        if not units and exr_only:
            raise SourceError(f"Relative_Reflectance: {exr_only}: only EXR images (dir_<k>_mip2.exr); the rows are "
                              f"drawn on MID's sRGB images: unpack multi_illumination_{pool}_mip2_jpg.zip here too")
        pools[pool] = units
    exr = next((u["albedo"] for us in pools.values() for u in us if (u["albedo"] or "").endswith(".exr")), None)
    if exr:
        read_exr(exr)  # fail at once, in one line, if EXR cannot be read here
    return pools


EXR_NEEDS = ("needs OpenCV (pip install opencv-python-headless) or imageio with an EXR plugin; or write "
             "MIDIntrinsics' albedo with --png (albedo.png)")


def read_exr(path: str) -> np.ndarray:
    """An EXR albedo as HxWx3 float (RGB); a SourceError naming the file and what is missing if no reader can."""
    try:
        os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
        import cv2

        a = cv2.imread(path, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
        if a is not None:
            a = np.asarray(a, dtype=np.float64)
            return a[..., ::-1] if a.ndim == 3 else a
    except ImportError:
        pass
    try:
        import imageio.v3 as iio

        return np.asarray(iio.imread(path), dtype=np.float64)
    except Exception:  # noqa: BLE001 - ImportError, or imageio without an EXR plugin
        raise SourceError(f"Relative_Reflectance: {path}: cannot read EXR albedo: {EXR_NEEDS}") from None


@functools.lru_cache(maxsize=8)
def luminance(path: str) -> np.ndarray:
    """The albedo's linear luminance (Rec. 709), HxW float."""
    if path.lower().endswith(".exr"):
        a = read_exr(path)
    else:
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
        except Exception as e:  # noqa: BLE001
            raise Skip("unreadable albedo", f"{path} ({type(e).__name__})") from None
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return a[..., :3] @ np.array([0.2126, 0.7152, 0.0722])


def disk_mean(Y: np.ndarray, x: float, y: float, r: float) -> float:
    H, W = Y.shape
    x0, x1, y0, y1 = int(max(0, x - r)), int(min(W, x + r + 1)), int(max(0, y - r)), int(min(H, y + r + 1))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    m = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    return float(Y[y0:y1, x0:x1][m].mean())


def relative(ya: float, yb: float) -> float:
    return abs(ya - yb) / max(ya, yb, 1e-8)


def prepare(unit: dict, rng, ctx, tries: int = 200) -> dict:
    if not unit["albedo"]:
        raise Skip("missing albedo", os.path.join(os.path.dirname(unit["path"]), "albedo.png|exr"))
    hashes = [phash_file(unit["path"])]  # Skip if unreadable
    W, H = image_size(unit["path"])
    Y = luminance(unit["albedo"])
    sy, sx = Y.shape[0] / H, Y.shape[1] / W  # the albedo may come at another resolution
    r = max(2.0, 0.01 * max(Y.shape))
    found: dict = {}
    for _ in range(tries):
        a = (float(rng.uniform(0.08 * W, 0.92 * W)), float(rng.uniform(0.08 * H, 0.92 * H)))
        b = (float(rng.uniform(0.08 * W, 0.92 * W)), float(rng.uniform(0.08 * H, 0.92 * H)))
        if np.hypot(a[0] - b[0], a[1] - b[1]) < max(W, H) / 6:
            continue
        ya, yb = disk_mean(Y, a[0] * sx, a[1] * sy, r), disk_mean(Y, b[0] * sx, b[1] * sy, r)
        if max(ya, yb) <= 1e-6:
            continue
        kind = "same" if relative(ya, yb) <= SAME else "diff"
        if kind not in found:
            found[kind] = (a, b) if ya <= yb else (b, a)  # (darker, lighter) for "diff"
        if len(found) == 2:
            break
    if not found:
        raise Skip("no usable point pair", unit["path"])
    labels = ([0, 1] if "diff" in found else []) + ([2] if "same" in found else [])
    return {"path": unit["path"], "pairs": found, "images": unit["images"], "labels": labels,
            "hashes": hashes, "sources": [unit["path"]], "prov": {"files": [unit["path"], unit["albedo"]]}}


def render(sample: dict, label: int) -> dict:
    if label == 2:
        a, b = sample["pairs"]["same"]
    else:
        dark, light = sample["pairs"]["diff"]
        a, b = (dark, light) if label == 0 else (light, dark)
    img = open_image(sample["path"])
    draw, scale = ImageDraw.Draw(img), marker_scale(img)
    draw_point(draw, a, "A", scale)
    draw_point(draw, b, "B", scale)
    return {"images": [img], "question": QUESTION, "text": TEXT, "choices": CHOICES, "answer": label,
            "prov": {"A": list(a), "B": list(b)}}


# "About the same" is about a quarter of the rows (paper, Appendix A.8): blocks of 8 rows hold A, B 3 times each, C twice
REFLECTANCE = {"scan": scan, "prepare": prepare, "render": render, "labels": 3, "weights": [3, 3, 2],
               "prompt": {"sep": " "}, "dedup": "annotated",
               "splits": {"train": "train", "val": "train", "test": "test"}}
