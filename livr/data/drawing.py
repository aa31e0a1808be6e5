"""Pixels for the procedural tasks (livr/data/synthetic.py): coordinate grids, colours at a distance from each
other, gradients, box geometry (overlap, IoU), procedural pictures (gradient + stripes + shapes) and the shapes the
localization task draws. Pure functions of an RNG and a size."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel coordinates in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    return y, x


@lru_cache(maxsize=8)
def load_font(size: int):
    return ImageFont.load_default(size=max(8, size))


def random_colour(rng, avoid=(), min_dist: float = 110.0) -> tuple[int, int, int]:
    """A random RGB colour at least `min_dist` (Euclidean) from every colour in `avoid`."""
    for _ in range(200):
        c = rng.integers(0, 256, size=3)
        if all(np.linalg.norm(c - np.asarray(a)) >= min_dist for a in avoid):
            break
    return tuple(int(v) for v in c)


def gradient(rng, size: int, c0, c1=None) -> np.ndarray:
    """A linear gradient c0 -> c1 (default: c0 +- 30 per channel) at a random angle, float HxWx3."""
    if c1 is None:
        c1 = np.clip(np.asarray(c0) + rng.integers(-30, 31, 3), 0, 255)
    y, x = grid(size)
    a = rng.uniform(0, 2 * np.pi)
    t = (np.cos(a) * (x - 0.5) + np.sin(a) * (y - 0.5)) / 1.42 + 0.5
    return np.asarray(c0, float) * (1 - t[..., None]) + np.asarray(c1, float) * t[..., None]


def to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def overlaps(box, boxes, gap: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in boxes)


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# --------------------------------------------------------------------------------------------- pictures
def picture_params(rng, palette=None) -> dict:
    """Parameters of a procedural picture: gradient + stripes + a few large shapes."""
    pal = palette or [random_colour(rng) for _ in range(5)]
    shapes = [{"kind": str(rng.choice(["ellipse", "rect"])), "cx": rng.uniform(0.1, 0.9), "cy": rng.uniform(0.1, 0.9),
               "rx": rng.uniform(0.08, 0.25), "ry": rng.uniform(0.08, 0.25), "colour": pal[2 + j % 3]}
              for j in range(int(rng.integers(3, 6)))]
    return {"palette": pal, "grad_seed": int(rng.integers(2**31)), "stripe_angle": rng.uniform(0, np.pi),
            "stripe_freq": rng.uniform(2.0, 6.0), "stripe_phase": rng.uniform(0, 2 * np.pi),
            "stripe_amp": rng.uniform(0.25, 0.6), "shapes": shapes}


def render_picture(p: dict, size: int) -> np.ndarray:
    pal = p["palette"]
    img = gradient(np.random.default_rng(p["grad_seed"]), size, pal[0], pal[1])
    y, x = grid(size)
    w = np.sin(2 * np.pi * p["stripe_freq"] * (np.cos(p["stripe_angle"]) * x + np.sin(p["stripe_angle"]) * y)
               + p["stripe_phase"])
    alpha = (p["stripe_amp"] * (w > 0))[..., None]
    img = img * (1 - alpha) + np.asarray(pal[2], float) * alpha
    pil = to_image(img)
    draw = ImageDraw.Draw(pil)
    for s in p["shapes"]:
        box = [(s["cx"] - s["rx"]) * size, (s["cy"] - s["ry"]) * size,
               (s["cx"] + s["rx"]) * size, (s["cy"] + s["ry"]) * size]
        (draw.ellipse if s["kind"] == "ellipse" else draw.rectangle)(box, fill=tuple(s["colour"]))
    return np.asarray(pil, dtype=float)


OBJECTS = ("ellipse", "triangle", "star", "diamond", "cross")


def draw_object(draw, kind: str, box, colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if kind == "ellipse":
        draw.ellipse(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif kind == "cross":
        draw.rectangle([x0, cy - h / 6, x1, cy + h / 6], fill=colour)
        draw.rectangle([cx - w / 6, y0, cx + w / 6, y1], fill=colour)
    else:  # five-pointed star touching all four sides of the box
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        px, py = np.cos(ang) * rad, np.sin(ang) * rad
        px = x0 + (px - px.min()) / np.ptp(px) * w
        py = y0 + (py - py.min()) / np.ptp(py) * h
        draw.polygon(list(zip(px.tolist(), py.tolist())), fill=colour)
