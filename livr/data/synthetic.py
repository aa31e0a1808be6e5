"""Procedural tasks in BLINK's schema whose answers depend on the pixels.

Every row is generated from its own RNG, derived from (seed, task, split, row index), so a row does not
depend on `n` and the splits never copy each other. Answers are balanced by construction: row i takes
its label from a random permutation of the labels for its block of rows (i // num_labels), so every
label occurs equally often up to rounding, while the text a blind model sees carries no information.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from livr.data.drawing import (
    OBJECTS,
    draw_object,
    gradient,
    iou,
    load_font,
    overlaps,
    picture_params,
    random_colour,
    render_picture,
    to_image,
)
from livr.data.prompts import blink_prompt, choice_letters
from livr.data.tasks import COLUMNS, IMAGE_COLUMNS, SYNTHETIC_TASKS, DataError, check_task
from livr.utils.atomic import replace_dir

GENERATOR_VERSION = 1  # bump when the pixels or texts change: invalidates make_synthetic's cache
REQUEST_FILE = "livr_synthetic.json"
RED, BLUE = (230, 25, 25), (25, 60, 235)
SECOND_THIRD = ["the second image", "the third image"]


def features():
    """BLINK's columns as `datasets.Features` (images may be None)."""
    from datasets import Features, Value
    from datasets import Image as HFImage
    from datasets import Sequence as HFSequence

    cols = {c: Value("string") for c in COLUMNS}
    cols.update({c: HFImage() for c in IMAGE_COLUMNS})
    cols["choices"] = HFSequence(Value("string"))
    return Features({c: cols[c] for c in COLUMNS})


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


class _Row:
    """Randomness for one row: `rng` for free choices, `label(name, k)` for balanced labels."""

    def __init__(self, seed: int, task: str, split: str, i: int):
        self.key = (_crc(task), _crc(split))
        self.seed, self.i = seed, i
        self.rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*self.key, 0, i)))

    def label(self, name: str, k: int) -> int:
        block = np.random.SeedSequence(self.seed, spawn_key=(*self.key, 1, _crc(name), self.i // k))
        return int(np.random.default_rng(block).permutation(k)[self.i % k])


# --------------------------------------------------------------------------------------------- tasks
def _counting(r: _Row, size: int, *, min_count: int = 1, max_count: int = 4, mode: str = "mc",
              num_choices: int = 4, shape_size: float = 0.0) -> dict:
    """k squares/circles; the total shape area is drawn independently of k (brightness gives no count).
    shape_size > 0 (a fraction of the side) gives every shape that size instead: the easy variant, where
    the covered area grows with k (what a tiny demo model can learn in a few hundred steps).
    mc: the choices are a window of `num_choices` consecutive counts placed at a random start, the true
    count at a balanced offset inside it and at a balanced letter, so the choices reveal nothing."""
    if mode not in ("mc", "open"):
        raise DataError(f"Counting: mode must be 'mc' or 'open', got {mode!r}")
    if not 0 <= min_count <= max_count:
        raise DataError(f"Counting: need 0 <= min_count <= max_count, got {min_count}, {max_count}")
    span = max_count - min_count + 1
    if mode == "open":
        k, choices, answer = min_count + r.label("count", span), [], None
    else:
        if span < num_choices:
            raise DataError(f"Counting: mode='mc' needs max_count - min_count + 1 >= num_choices ({num_choices})")
        start = min_count + int(r.rng.integers(0, span - num_choices + 1))
        k = start + r.label("offset", num_choices)
        pos = r.label("letter", num_choices)
        others = [v for v in range(start, start + num_choices) if v != k]
        others = [others[j] for j in r.rng.permutation(len(others))]
        choices = [str(v) for v in others[:pos] + [k] + others[pos:]]
        answer = pos
    rng, bg = r.rng, random_colour(r.rng)
    pil = to_image(gradient(rng, size, bg))
    draw = ImageDraw.Draw(pil)
    area = rng.uniform(0.05, 0.18) * size * size  # total shape area, independent of k
    for attempt in range(50):
        sides = np.sqrt(area * 0.8**attempt * rng.dirichlet(np.full(max(k, 1), 2.0)))
        if shape_size > 0:
            sides = np.full(max(k, 1), shape_size * size * 0.97**attempt)
        boxes = []
        for side in np.clip(sides, max(5, size * 0.06), size * 0.45).astype(int)[:k]:
            for x0, y0 in rng.integers(1, size - side - 1, size=(200, 2)).tolist():
                if not overlaps((x0, y0, x0 + side, y0 + side), boxes, 3):
                    boxes.append((x0, y0, x0 + side, y0 + side))
                    break
        if len(boxes) == k:
            break
    else:
        raise DataError(f"Counting: cannot place {k} shapes on a {size}px image; use a larger image_size")
    for box in boxes:
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=random_colour(rng, [bg]))
    question = "How many shapes (squares and circles) are in the image?"
    return {"images": [pil], "question": question, "choices": choices, "answer": answer if choices else str(k)}


def _relative_reflectance(r: _Row, size: int, *, same_threshold: float = 0.10, shading: float = 0.0) -> dict:
    """Two outlined regions A (red) and B (blue) of two grey levels on a cluttered grey scene.
    Labels: A darker / B darker / about the same (relative difference <= same_threshold; generated
    differences stay well away from the threshold: <= 0.6x it, or >= 2x it)."""
    rng, label = r.rng, r.label("label", 3)
    tint = rng.uniform(0.8, 1.0, size=3)
    light = rng.uniform(0.4, 0.95)
    rel = rng.uniform(0, 0.6 * same_threshold) if label == 2 else rng.uniform(max(0.2, 2 * same_threshold), 0.6)
    dark = light * (1 - rel)
    a, b = (dark, light) if label == 0 else (light, dark)
    if label == 2 and rng.random() < 0.5:
        a, b = b, a
    def grey(g: float) -> tuple[int, ...]:
        return tuple(int(round(v)) for v in g * tint * 255)  # noqa: RUF046

    pil = Image.new("RGB", (size, size), grey(rng.uniform(0.15, 0.95)))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(4, 8))):  # clutter
        x0, y0, w, h = rng.integers(0, size, 2).tolist() + rng.integers(size // 8, size // 2, 2).tolist()
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=grey(rng.uniform(0.1, 1)))
    boxes = []
    while len(boxes) < 2:
        side = int(rng.uniform(0.2, 0.3) * size)
        x0, y0 = rng.integers(3, size - side - 3, 2).tolist()
        box = (x0, y0, x0 + side, y0 + side)
        if not overlaps(box, boxes, 6):
            boxes.append(box)
    font = load_font(size // 9)
    for box, g, colour, name in zip(boxes, (a, b), (RED, BLUE), "AB"):
        draw.rectangle(box, fill=grey(g))
        draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], outline=colour, width=2)
        draw.text((box[0] + 2, box[1]), name, fill=colour, font=font)
    if shading:
        pil = to_image(np.asarray(pil, float) * (1 - shading * gradient(rng, size, (0,) * 3, (1,) * 3)))
    question = "Which point has darker surface color, or are they about the same?"
    return {"images": [pil], "question": question, "choices": ["A is darker", "B is darker", "About the same"],
            "answer": label}


def _object_localization(r: _Row, size: int, *, min_area: float = 0.15, max_area: float = 0.5,
                         min_iou: float = 0.2, max_iou: float = 0.5) -> dict:
    """One object; a red box (choice A) and a blue box (choice B); one fits the object tightly, the
    other has IoU in [min_iou, max_iou] with it."""
    rng, label = r.rng, r.label("label", 2)
    kind = str(rng.choice(OBJECTS))
    bg = random_colour(rng, [RED, BLUE], 120)
    pil = to_image(gradient(rng, size, bg))
    draw = ImageDraw.Draw(pil)
    for _ in range(1000):
        frac, aspect = rng.uniform(min_area, max_area), rng.uniform(0.6, 1.6)
        w, h = size * np.sqrt(frac * aspect), size * np.sqrt(frac / aspect)
        if w > size - 8 or h > size - 8:
            continue
        x0, y0 = rng.uniform(3, size - w - 3), rng.uniform(3, size - h - 3)
        tight = (x0, y0, x0 + w, y0 + h)
        for _ in range(200):
            sx, sy = rng.uniform(0.5, 1.7, 2)
            dw, dh = w * sx, h * sy
            dx0 = x0 + w / 2 - dw / 2 + rng.uniform(-0.5, 0.5) * w
            dy0 = y0 + h / 2 - dh / 2 + rng.uniform(-0.5, 0.5) * h
            other = (dx0, dy0, dx0 + dw, dy0 + dh)
            if 2 <= dx0 and 2 <= dy0 and other[2] <= size - 3 and other[3] <= size - 3 \
                    and min_iou <= iou(tight, other) <= max_iou:
                break
        else:
            continue
        break
    else:
        raise DataError("Object_Localization: could not place a distractor box; check the IoU/area options")
    draw_object(draw, kind, [round(v) for v in tight], random_colour(rng, [bg, RED, BLUE], 110))
    order = list(zip([tight, other] if label == 0 else [other, tight], (RED, BLUE)))
    for box, colour in (order if rng.random() < 0.5 else order[::-1]):
        draw.rectangle([round(box[0]) - 1, round(box[1]) - 1, round(box[2]) + 1, round(box[3]) + 1],
                       outline=colour, width=2)
    question = f"Which bounding box more accurately localizes the {kind}?"
    return {"images": [pil], "question": question, "choices": ["the red box", "the blue box"], "answer": label}


def _jigsaw(r: _Row, size: int, *, same_palette: bool = False) -> dict:
    """image_1: a picture with its bottom-right quadrant blacked out; image_2/image_3: that quadrant and
    the bottom-right quadrant of another picture (sharing the palette if same_palette)."""
    rng, label = r.rng, r.label("label", 2)
    p = picture_params(rng)
    q = picture_params(rng, p["palette"] if same_palette else None)
    full, other = render_picture(p, size), render_picture(q, size)
    h = size // 2
    true, fake = to_image(full[h:, h:]), to_image(other[h:, h:])
    full[h:, h:] = 0
    cands = [true, fake] if label == 0 else [fake, true]
    question = "The first image has its bottom-right quadrant missing. Which image is the missing part?"
    return {"images": [to_image(full), *cands], "question": question, "choices": SECOND_THIRD, "answer": label}


def _visual_similarity(r: _Row, size: int, *, same_palette: bool = True, max_shift: int = 3,
                       noise: float = 6.0, jitter: float = 0.08) -> dict:
    """image_1: reference; one candidate is the reference shifted by <= max_shift px, with Gaussian noise
    and a colour jitter, the other a different picture (same palette if same_palette)."""
    rng, label = r.rng, r.label("label", 2)
    p = picture_params(rng)
    q = picture_params(rng, p["palette"] if same_palette else None)
    ref = render_picture(p, size)
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
    pert = np.roll(ref, (dy, dx), axis=(0, 1)) * rng.uniform(1 - jitter, 1 + jitter, 3)
    pert = pert + rng.normal(0, noise, pert.shape)
    cands = [to_image(pert), to_image(render_picture(q, size))]
    question = "The first image is the reference. Which image is most similar to the reference image?"
    return {"images": [to_image(ref), *(cands if label == 0 else cands[::-1])], "question": question,
            "choices": SECOND_THIRD, "answer": label}


GENERATORS: dict[str, Callable[..., dict]] = {
    "Counting": _counting, "Jigsaw": _jigsaw, "Object_Localization": _object_localization,
    "Relative_Reflectance": _relative_reflectance, "Visual_Similarity": _visual_similarity,
}
assert tuple(GENERATORS) == SYNTHETIC_TASKS


def task_options(task: str) -> dict:
    """The options a generator takes, with their defaults."""
    sig = inspect.signature(GENERATORS[check_task(task, SYNTHETIC_TASKS, "synthetic task")])
    return {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def generate_task(task: str, n: int, *, seed: int, split: str = "train", image_size: int = 112,
                  progress: bool = False, **task_opts) -> list[dict]:
    """n rows of a synthetic task in BLINK's schema (images as PIL RGB, unused slots None)."""
    gen = GENERATORS[check_task(task, SYNTHETIC_TASKS, "synthetic task")]
    unknown = sorted(set(task_opts) - set(task_options(task)))
    if unknown:
        raise DataError(f"{task}: unknown option(s) {', '.join(unknown)} (valid: {', '.join(task_options(task))})")
    if n < 0 or image_size < 32 or seed < 0:
        raise DataError(f"{task}: need n >= 0, image_size >= 32, seed >= 0 (got {n}, {image_size}, {seed})")
    rows = []
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{task}/{split}", unit="row", leave=False, disable=None)  # None: on a terminal only
    for i in it:
        out = gen(_Row(seed, task, split, i), image_size, **task_opts)
        choices, images = out["choices"], out["images"]
        answer = f"({choice_letters(len(choices))[out['answer']]})" if choices else out["answer"]
        row = {"idx": f"{task}_{split}_{i}", "question": out["question"], "sub_task": task}
        row.update({c: (images[j] if j < len(images) else None) for j, c in enumerate(IMAGE_COLUMNS)})
        row.update(choices=list(choices), answer=answer, prompt=blink_prompt(out["question"], choices),
                   explanation="")
        rows.append(row)
    return rows


def _opts_per_task(tasks: Sequence[str], task_opts: Mapping) -> dict[str, dict]:
    """Options are flat (given to every task that takes them) or nested per task: {"Counting": {...}}."""
    flat = {k: v for k, v in task_opts.items() if k not in SYNTHETIC_TASKS}
    taken = set()
    per = {}
    for t in tasks:
        valid = task_options(t)
        per[t] = {k: v for k, v in flat.items() if k in valid}
        taken |= set(per[t])
        nested = task_opts.get(t) or {}
        if not isinstance(nested, Mapping):
            raise DataError(f"options for {t} must be a mapping, got {nested!r}")
        per[t].update(nested)
    unknown = sorted(set(flat) - taken)
    if unknown:
        raise DataError(f"unknown synthetic option(s) {', '.join(unknown)} for tasks {', '.join(tasks)}")
    return per


def make_synthetic(out_dir: str, tasks: Sequence[str], sizes: Mapping[str, int] = {"train": 200, "val": 50, "test": 50},
                   *, seed: int = 42, image_size: int = 112, parquet: bool = False, progress: bool = True,
                   **task_opts) -> dict[str, str]:
    """Write each task as a `datasets.DatasetDict` (save_to_disk) at out_dir/<task>/, plus
    out_dir/<task>/<split>.parquet if parquet. Atomic (temp dir + rename); a task whose recorded request
    (out_dir/<task>/livr_synthetic.json) equals this one is left as is. Returns {task: path}."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    tasks = list(tasks)
    for t in tasks:
        check_task(t, SYNTHETIC_TASKS, "synthetic task")
    per_task = _opts_per_task(tasks, task_opts)
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    bars_were_off = are_progress_bars_disabled()
    paths = {}
    try:
        if not progress:
            disable_progress_bars()
        for task in tasks:
            path = os.path.join(out_dir, task)
            request = json.loads(json.dumps({
                "generator_version": GENERATOR_VERSION, "task": task, "sizes": dict(sizes), "seed": seed,
                "image_size": image_size, "parquet": parquet, "options": per_task[task]}, sort_keys=True))
            paths[task] = path
            if _recorded(path) != request:
                _write_task(path, request, progress)
    finally:
        if not progress and not bars_were_off:
            enable_progress_bars()
    return paths


def _recorded(path: str) -> dict | None:
    try:
        with open(os.path.join(path, REQUEST_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_task(path: str, request: dict, progress: bool) -> None:
    """Generate into a temp dir next to `path`, then swap it in (another writer may win the race)."""
    from datasets import Dataset, DatasetDict

    out_dir, task = os.path.dirname(path), request["task"]
    tmp = tempfile.mkdtemp(prefix=f".{task}.tmp-", dir=out_dir)
    try:
        dd = DatasetDict({split: Dataset.from_list(
            generate_task(task, n, seed=request["seed"], split=split, image_size=request["image_size"],
                          progress=progress, **request["options"]), features=features())
            for split, n in request["sizes"].items()})
        dd.save_to_disk(tmp)
        if request["parquet"]:
            for split, ds in dd.items():
                ds.to_parquet(os.path.join(tmp, f"{split}.parquet"))
        with open(os.path.join(tmp, REQUEST_FILE), "w") as f:
            json.dump(request, f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o755)
        if _recorded(path) != request:  # else an identical copy appeared meanwhile: keep it
            replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
