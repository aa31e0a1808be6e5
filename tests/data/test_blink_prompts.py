"""The training prompts equal BLINK's `prompt` field character for character (line breaks included), pinned per
task as literal strings and checked against what each builder's render + the driver actually emit. What each
text rests on (a public quote of BLINK's field, a measured length, or a reconstruction) is in docs/data.md."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from livr.data.build import get_spec
from livr.data.build.driver import _row

SEM = ("Humans can find corresponding points for different objects in the same category. For instance, if there are "
       "images of two different cats, then the left ear tip of one cat corresponds to the left ear tip of the other "
       "cat, and the right front paw of one cat corresponds to the right front paw of the other cat.\nGiven the "
       "following two images, a reference point is annotated on the first image, labeled with REF. You are given "
       "multiple red-circled points on the second image, choices of \"A, B, C, D\" are drawn beside each circle. "
       "Select between the choices on the second image and find the corresponding point for the reference point. "
       "Which point is corresponding to the reference point?\nSelect from the following choices.\n(A) Point A\n"
       "(B) Point B\n(C) Point C\n(D) Point D\n")
FUNC = ("Humans can find corresponding points for the same action between different objects. For instance, if a "
        "person uses a pot versus a hammer to \"Mash Pound\", then the handle of the pot will be the corresponding "
        "point to the handle of the hammer because they serve the same function for the action -- to hold; and the "
        "bottom of the pot will be the corresponding point to the face of the hammer because they both mash the "
        "other object.\nGiven the following two images, a reference point is annotated on the first image, labeled "
        "with REF. You are given multiple red-circled points on the second image, choices of \"A, B, C, D\" are "
        "drawn beside each circle. Select between the choices on the second image and find the corresponding point "
        "for the reference point, if we use both items for the action: \"Pour\". Which point is corresponding to "
        "the reference point?\nSelect from the following choices.\n(A) Point A\n(B) Point B\n(C) Point C\n"
        "(D) Point D")
EXPECTED = {
    "Jigsaw": (
        ("Given the first image with the lower right corner missing, can you tell which one of the second image or "
        "the third image is the missing part? Imagine which image would be more appropriate to place in the missing "
        "spot. You can also carefully observe and compare the edges of the images.\nSelect from the following "
        "choices.\n\n(A) the second image\n(B) the third image\n"), 363),
    "Object_Localization": (
        ("A bounding box is an annotated rectangle surrounding an object. The edges of bounding boxes should touch "
        "the outermost pixels of the object that is being labeled. Given the two bounding boxes on the image, "
        "labeled by A and B, which bounding box more accurately localizes and encloses the car?\nSelect from the "
        "following options.\n(A) Box A\n(B) Box B"), None),
    "Art_Style": (
        ("Some most common art painting styles include Realism, Impressionism, Expressionism, Pop Art, and Cubism. "
        "Given the following images of art paintings, use the first image as the reference image, and determine "
        "which one of the second or the third image shares the same style as the reference image?\nSelect from "
        "the following choices.\n(A) the second image\n(B) the third image\n"), 373),
    "Semantic_Correspondence": (SEM, 768),
    "Relative_Reflectance": (
        ("Two points are annotated on the image, labeled by A and B. Consider the surface color of the points (the "
        "albedo of the surface, without the effect of shading). Which point has darker surface color, or the colors "
        "is about the same? Select from the following choices.\n(A) A is darker\n(B) B is darker\n(C) About the "
        "same"), 316),
    "Visual_Similarity": (
        ("Given three similar but different images, take the first image as reference. Can you tell which one of the "
        "latter two images is most similar to the first one?\nSelect from the following choices.\n\n(A) the second "
        "image\n(B) the third image\n"), None),
    "Visual_Correspondence": (
        ("A point is circled on the first image, labeled with REF. We change the camera position or lighting and "
        "shoot the second image. You are given multiple red-circled points on the second image, choices of \"A, B, "
        "C, D\" are drawn beside each circle. Which point on the second image corresponds to the point in the first "
        "image? Select from the following options.\n(A) Point A\n(B) Point B\n(C) Point C\n(D) Point D"), None),
    "Functional_Correspondence": (FUNC, None),
    "Counting": ("How many apples are there in the image?\nAnswer with a number.", None),
}


def _sample(task: str, tmp) -> dict:
    """A minimal prepared sample for the builder's own render (real image files, fixed geometry)."""
    paths = []
    for k in range(3):
        p = os.path.join(tmp, f"{k}.png")
        Image.new("RGB", (96, 72), (40 * k, 90, 160)).save(p)
        paths.append(p)
    pts = {"src": paths[0], "trg": paths[1], "ref": (20.0, 20.0), "true": (30.0, 30.0),
           "distractors": [(70.0, 15.0), (15.0, 60.0), (80.0, 60.0)]}
    return {
        "Jigsaw": {"path": paths[0], "canvas": (0, 0, 64, 48), "true": (32, 24, 64, 48), "fake": (64, 0, 96, 24)},
        "Object_Localization": {"path": paths[0], "box": [10, 10, 60, 50], "other": [20, 15, 70, 60], "obj": "car"},
        "Art_Style": {"paths": paths},
        "Visual_Similarity": {"paths": paths},
        "Semantic_Correspondence": pts,
        "Visual_Correspondence": pts,
        "Functional_Correspondence": {**pts, "action": "Pour"},
        "Relative_Reflectance": {"path": paths[0], "pairs": {"same": ((10, 10), (60, 40)), "diff": ((10, 10), (60, 40))}},
        "Counting": {"path": paths[0], "count": 3, "label": "apples"},
    }[task]


@pytest.mark.parametrize("task", list(EXPECTED))
def test_builder_prompt_is_blinks(task, tmp_path):
    want, length = EXPECTED[task]
    if length is not None:  # BLINK's measured length (docs/data.md)
        assert len(want) == length
    spec = get_spec(task)
    for label in range(spec["labels"]):
        out = spec["render"](_sample(task, str(tmp_path)), label)
        out.pop("prov", None)
        assert _row(task, "train", 0, out, spec.get("prompt", {}))["prompt"] == want
