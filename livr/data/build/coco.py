"""Jigsaw and Object_Localization from COCO 2017 (paper Appendix A.2, A.3), in BLINK's formats.

Layout: SRC/train2017/*.jpg, SRC/val2017/*.jpg and (Object_Localization) SRC/annotations/
instances_{train,val}2017.json, as the official zips unpack. Our train split draws from train2017, val and
test from val2017 (disjoint images). The instances json is read whole (json has no streaming reader in the
standard library: ~2-3 GB of RAM for train2017); only the few fields used are kept."""

from __future__ import annotations

import json
import os

from PIL import ImageDraw

from livr.data.build.common import (
    BLUE,
    RED,
    Skip,
    SourceError,
    draw_box,
    image_size,
    marker_scale,
    open_image,
    phash,
    phash_file,
)

POOLS = ("train2017", "val2017")
SPLITS = {"train": "train2017", "val": "val2017", "test": "val2017"}
SECOND_THIRD = ["the second image", "the third image"]
JIGSAW_TEXT = ("Given the first image with the lower right corner missing, can you tell which one of the second "
               "image or the third image is the missing part? Imagine which image would be more appropriate to "
               "place in the missing spot. You can also carefully observe and compare the edges of the images.")
JIGSAW_Q = "Which image is the missing part in the first image?"
LOC_TEXT = ("A bounding box is an annotated rectangle surrounding an object. The edges of bounding boxes should "
            "touch the outermost pixels of the object that is being labeled. Given the two bounding boxes on the "
            "image, labeled by A and B, which bounding box more accurately localizes and encloses the {obj}?")
LOC_Q = "Which bounding box more accurately localizes and encloses the {obj}?"


def _image_dir(source: str, pool: str) -> str:
    d = os.path.join(source, pool)
    if not os.path.isdir(d):
        raise SourceError(f"COCO: {d}: missing (unpack {pool}.zip here)")
    return d


# --------------------------------------------------------------------------------------------- Jigsaw
def scan_jigsaw(source: str) -> dict:
    pools = {}
    for pool in POOLS:
        d = _image_dir(source, pool)
        names = sorted(e.name for e in os.scandir(d) if e.is_file() and e.name.lower().endswith((".jpg", ".png")))
        pools[pool] = [{"key": f"{pool}/{n}", "group": f"{pool}/{n}", "images": [f"{pool}/{n}"],
                        "path": os.path.join(d, n)} for n in names]
    return pools


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def prepare_jigsaw(unit: dict, rng, ctx) -> dict:
    img = open_image(unit["path"])
    W, H = img.size
    cw = min(400, W) // 2 * 2
    ch = min(round(cw * rng.uniform(170, 230) / 400), H) // 2 * 2
    if cw < 32 or ch < 32:
        raise Skip("image too small", unit["path"])
    x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
    qw, qh = cw // 2, ch // 2
    true = (x0 + qw, y0 + qh, x0 + cw, y0 + ch)
    canvas = (x0, y0, x0 + cw, y0 + ch)
    min_dist = 0.3 * (cw**2 + ch**2) ** 0.5
    for _ in range(300):
        dx, dy = int(rng.integers(0, W - qw + 1)), int(rng.integers(0, H - qh + 1))
        fake = (dx, dy, dx + qw, dy + qh)
        far = ((dx - true[0]) ** 2 + (dy - true[1]) ** 2) ** 0.5 >= min_dist
        if _overlap(fake, canvas) and not _overlap(fake, true) and far:
            break
    else:
        raise Skip("no room for a distractor patch", unit["path"])
    return {"path": unit["path"], "canvas": canvas, "true": true, "fake": fake, "images": unit["images"],
            "hashes": [phash(img)], "sources": [unit["path"]],
            "prov": {"files": [unit["path"]], "canvas": canvas, "true": true, "fake": fake}}


def render_jigsaw(sample: dict, label: int) -> dict:
    img = open_image(sample["path"])
    canvas = img.crop(sample["canvas"])
    cw, ch = canvas.size
    ImageDraw.Draw(canvas).rectangle([cw // 2, ch // 2, cw - 1, ch - 1], fill=(0, 0, 0))
    true, fake = img.crop(sample["true"]), img.crop(sample["fake"])
    cands = [true, fake] if label == 0 else [fake, true]
    return {"images": [canvas, *cands], "question": JIGSAW_Q, "text": JIGSAW_TEXT, "choices": SECOND_THIRD,
            "answer": label}


JIGSAW = {"scan": scan_jigsaw, "prepare": prepare_jigsaw, "render": render_jigsaw, "labels": 2, "splits": SPLITS,
          "prompt": {"blank": True, "end": "\n"}}


# --------------------------------------------------------------------------------------------- Localization
def _read_instances(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SourceError(f"Object_Localization: {path}: missing annotation file") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"Object_Localization: {path}: not a COCO instances json ({e})") from None
    if not all(k in data for k in ("images", "annotations", "categories")):
        raise SourceError(f"Object_Localization: {path}: not a COCO instances json (needs images, annotations, "
                          f"categories)")
    return data


def scan_localization(source: str, min_frac: float = 0.15, max_frac: float = 0.5, min_fill: float = 0.6) -> dict:
    pools = {}
    for pool in POOLS:
        d = _image_dir(source, pool)
        data = _read_instances(os.path.join(source, "annotations", f"instances_{pool}.json"))
        images = {im["id"]: (im["file_name"], im["width"], im["height"]) for im in data["images"]}
        names = {c["id"]: c["name"] for c in data["categories"]}
        units = []
        for a in data["annotations"]:
            if a.get("iscrowd") or a["image_id"] not in images:
                continue
            fname, W, H = images[a["image_id"]]
            x, y, w, h = (float(v) for v in a["bbox"])
            if w <= 0 or h <= 0 or not min_frac <= w * h / (W * H) <= max_frac or a.get("area", 0) < min_fill * w * h:
                continue
            units.append({"key": f"{pool}:{a['id']}", "group": f"{pool}/{a['image_id']}",
                          "images": [f"{pool}/{a['image_id']}"], "path": os.path.join(d, fname),
                          "box": [x, y, x + w, y + h], "size": [W, H], "obj": names.get(a["category_id"], "object")})
        del data
        pools[pool] = units
    return pools


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def prepare_localization(unit: dict, rng, ctx, lo: float = 0.2, hi: float = 0.5) -> dict:
    W, H = unit["size"]
    box = unit["box"]
    if box[0] < -0.5 or box[1] < -0.5 or box[2] > W + 0.5 or box[3] > H + 0.5:
        raise Skip("box outside the image", f"{unit['path']} box {box} image {W}x{H}")
    hashes = [phash_file(unit["path"])]  # Skip if unreadable
    if list(image_size(unit["path"])) != [W, H]:
        raise Skip("image size differs from the annotation", unit["path"])
    w, h = box[2] - box[0], box[3] - box[1]
    for _ in range(2000):
        s = rng.uniform(0.1, 0.6)
        j = rng.normal(0, s, 4) * [w, h, w, h]
        other = [min(max(box[0] + j[0], 0), W), min(max(box[1] + j[1], 0), H),
                 min(max(box[2] + j[2], 0), W), min(max(box[3] + j[3], 0), H)]
        if other[2] - other[0] > 4 and other[3] - other[1] > 4 and lo <= iou(box, other) <= hi:
            break
    else:
        raise Skip("no distractor box with IoU in range", unit["path"])
    other = [float(v) for v in other]
    return {"path": unit["path"], "box": box, "other": other, "obj": unit["obj"], "images": unit["images"],
            "hashes": hashes, "sources": [unit["path"]],
            "prov": {"files": [unit["path"]], "box": box, "distractor": other, "object": unit["obj"]}}


def render_localization(sample: dict, label: int) -> dict:
    img = open_image(sample["path"])
    a, b = (sample["box"], sample["other"]) if label == 0 else (sample["other"], sample["box"])
    draw, scale = ImageDraw.Draw(img), marker_scale(img)
    draw_box(draw, [round(v) for v in a], "A", scale, RED)
    draw_box(draw, [round(v) for v in b], "B", scale, BLUE)
    obj = sample["obj"]
    return {"images": [img], "question": LOC_Q.format(obj=obj), "text": LOC_TEXT.format(obj=obj),
            "choices": ["Box A", "Box B"], "answer": label}


LOCALIZATION = {"scan": scan_localization, "prepare": prepare_localization, "render": render_localization,
                "labels": 2, "splits": SPLITS, "prompt": {"select": "options"}, "dedup": "annotated"}
