"""The correspondence tasks' shared rendering (BLINK's format): REF circled on the first image, four
red-circled candidates labelled A-D beside each circle on the second, the true one at the answer's letter."""

from __future__ import annotations

from PIL import ImageDraw

from livr.data.build.common import draw_point, marker_scale, open_image
from livr.data.prompts import choice_letters

POINT_CHOICES = ["Point A", "Point B", "Point C", "Point D"]


def order_candidates(true, distractors, label: int) -> list:
    """The four candidate points in letter order, the true one at `label`."""
    d = list(distractors)
    return [*d[:label], true, *d[label:]]


def render_points(src_path: str, trg_path: str, ref, true, distractors, label: int) -> tuple:
    """(source image with REF, target image with candidates A-D, candidates in letter order)."""
    src, trg = open_image(src_path), open_image(trg_path)
    draw_point(ImageDraw.Draw(src), ref, "REF", marker_scale(src))
    cands = order_candidates(true, distractors, label)
    draw, scale = ImageDraw.Draw(trg), marker_scale(trg)
    for letter, pt in zip(choice_letters(len(cands)), cands):
        draw_point(draw, pt, letter, scale)
    return src, trg, cands
