"""livr.data: synthetic generator, BLINK loader and validation, prompts and answer parsing (CPU, offline)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from livr.data import (
    BLINK_TASKS,
    PAPER_TASKS,
    SYNTHETIC_TASKS,
    DataError,
    choice_letters,
    features,
    format_prompt,
    generate_task,
    is_correct,
    load_blink,
    make_synthetic,
    parse_answer,
    target_text,
)
from livr.data.tasks import COLUMNS, IMAGE_COLUMNS

NUM_IMAGES = {"Counting": 1, "Object_Localization": 1, "Relative_Reflectance": 1, "Jigsaw": 3, "Visual_Similarity": 3}
NUM_CHOICES = {"Counting": 4, "Object_Localization": 2, "Relative_Reflectance": 3, "Jigsaw": 2, "Visual_Similarity": 2}
N = 96  # divisible by 2, 3 and 4


@pytest.fixture(scope="module")
def rows():
    """{task: {split: rows}} generated once for the module."""
    return {t: {s: generate_task(t, N, seed=7, split=s) for s in ("train", "val")} for t in SYNTHETIC_TASKS}


def pixels(img) -> bytes:
    return np.asarray(img.convert("RGB")).tobytes() if img is not None else b""


def row_key(row) -> tuple:
    return tuple(pixels(row[c]) if c in IMAGE_COLUMNS else repr(row[c]) for c in COLUMNS)


def letter_index(row) -> int:
    return ord(row["answer"][1]) - ord("A")


# ----------------------------------------------------------------------------------------- task names
def test_task_lists():
    assert PAPER_TASKS == ("Counting", "Jigsaw", "Object_Localization", "Visual_Correspondence", "Art_Style",
                           "Semantic_Correspondence", "Functional_Correspondence", "Relative_Reflectance",
                           "Visual_Similarity")
    assert len(BLINK_TASKS) == 14 and BLINK_TASKS[:9] == PAPER_TASKS
    assert {"IQ_Test", "Multi-view_Reasoning", "Forensic_Detection", "Relative_Depth", "Spatial_Relation"} < set(BLINK_TASKS)
    assert set(SYNTHETIC_TASKS) <= set(PAPER_TASKS) and len(SYNTHETIC_TASKS) == 5
    with pytest.raises(DataError, match=r"Countng.*Counting, Jigsaw"):
        generate_task("Countng", 2, seed=0)
    with pytest.raises(DataError, match="Art_Style"):  # a BLINK task without a generator
        make_synthetic("/nonexistent-never-created", ["Art_Style"])
    with pytest.raises(DataError, match="max_cnt"):
        generate_task("Counting", 2, seed=0, max_cnt=3)


# ----------------------------------------------------------------------------------------- generator
@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_deterministic(task, rows):
    a = generate_task(task, 8, seed=7, split="train")
    assert [row_key(r) for r in a] == [row_key(r) for r in rows[task]["train"][:8]]  # also: row i ignores n
    b = generate_task(task, 8, seed=8, split="train")
    assert all(pixels(x["image_1"]) != pixels(y["image_1"]) for x, y in zip(a, b))
    val = rows[task]["val"][:8]
    assert all(pixels(x["image_1"]) != pixels(y["image_1"]) for x, y in zip(a, val))


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_schema(task, rows):
    for split, rs in rows[task].items():
        for i, r in enumerate(rs):
            assert list(r) == list(COLUMNS)
            assert r["idx"] == f"{task}_{split}_{i}" and r["sub_task"] == task and r["explanation"] == ""
            k = NUM_IMAGES[task]
            assert all(isinstance(r[c], Image.Image) and r[c].mode == "RGB" for c in IMAGE_COLUMNS[:k])
            assert all(r[c] is None for c in IMAGE_COLUMNS[k:])
            assert r["image_1"].size == (112, 112)
            assert isinstance(r["choices"], list) and len(r["choices"]) == NUM_CHOICES[task]
            assert all(isinstance(c, str) and c for c in r["choices"])
            assert re.fullmatch(r"\([A-Z]\)", r["answer"]) and letter_index(r) < len(r["choices"])
            lines = [f"({letter}) {c}" for letter, c in zip("ABCD", r["choices"])]
            assert r["prompt"] == "\n".join([r["question"], "Select from the following choices.", *lines])
            assert format_prompt(r) == r["prompt"]
    if task == "Jigsaw":
        assert rows[task]["train"][0]["image_2"].size == (56, 56)


def test_counting_open_and_range():
    rs = generate_task("Counting", 45, seed=1, mode="open", min_count=2, max_count=10)
    assert all(r["choices"] == [] and r["answer"].isdigit() for r in rs)
    assert Counter(int(r["answer"]) for r in rs) == {k: 5 for k in range(2, 11)}  # balanced by construction
    assert rs[0]["prompt"] == rs[0]["question"] + "\nAnswer with a number."
    mc = generate_task("Counting", 40, seed=1, min_count=2, max_count=10)
    for r in mc:  # choices: 4 consecutive counts within 2..10, shuffled
        vals = sorted(int(c) for c in r["choices"])
        assert vals == list(range(vals[0], vals[0] + 4)) and 2 <= vals[0] and vals[-1] <= 10
    with pytest.raises(DataError, match="num_choices"):
        generate_task("Counting", 2, seed=0, min_count=1, max_count=2)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_answers_balanced(task, rows):
    counts = Counter(r["answer"] for r in rows[task]["train"])
    assert sorted(counts) == [f"({x})" for x in choice_letters(NUM_CHOICES[task])]
    assert set(counts.values()) == {N // NUM_CHOICES[task]}
    odd = Counter(r["answer"] for r in generate_task(task, 7, seed=3))
    assert max(odd.values()) - min(odd.values()) <= 1 and len(odd) == NUM_CHOICES[task]


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_blind_baseline_at_chance(task, rows):
    """A text-only model (majority answer per prompt text, else overall) is at chance on val."""
    by_prompt, overall = {}, Counter()
    for r in rows[task]["train"]:
        by_prompt.setdefault(r["prompt"], Counter())[r["answer"]] += 1
        overall[r["answer"]] += 1
    acc = np.mean([(by_prompt.get(r["prompt"]) or overall).most_common(1)[0][0] == r["answer"]
                   for r in rows[task]["val"]])
    chance = 1 / NUM_CHOICES[task]
    assert abs(acc - chance) <= 0.15, (task, acc)


def _jigsaw_oracle(r) -> int:
    full = np.asarray(r["image_1"], float)
    h = full.shape[0] // 2
    errs = []
    for c in ("image_2", "image_3"):
        p = np.asarray(r[c], float)
        errs.append(np.abs(p[0] - full[h - 1, h:]).mean() + np.abs(p[:, 0] - full[h:, h - 1]).mean())
    return int(np.argmin(errs))


def _similarity_oracle(r) -> int:
    ref = np.asarray(r["image_1"], float)
    return int(np.argmin([((np.asarray(r[c], float) - ref) ** 2).mean() for c in ("image_2", "image_3")]))


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max(), ys.max()


def _reflectance_oracle(r) -> int:
    img = np.asarray(r["image_1"]).astype(int)
    greys = []
    for colour in ((230, 25, 25), (25, 60, 235)):
        x0, y0, x1, y1 = _bbox((img == colour).all(-1))
        greys.append(np.median(img[y0 + 3:y1 - 2, x0 + 3:x1 - 2].reshape(-1, 3), axis=0).mean())
    a, b = greys
    return 2 if abs(a - b) / max(a, b) <= 0.10 else (0 if a < b else 1)


def _localization_oracle(r) -> int:
    img = np.asarray(r["image_1"]).astype(int)
    flat = [tuple(p) for p in img.reshape(-1, 3) if tuple(p) not in ((230, 25, 25), (25, 60, 235))]
    obj = Counter(flat).most_common(1)[0][0]  # the flat-coloured object beats every gradient shade
    ob = _bbox((img == obj).all(-1))

    def iou(a, b):
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    return int(np.argmax([iou(ob, _bbox((img == c).all(-1))) for c in ((230, 25, 25), (25, 60, 235))]))


def _counting_oracle(r) -> int:
    from scipy import ndimage  # scipy comes with mlflow (and scikit-learn)

    img = np.asarray(r["image_1"], float)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    design = np.stack([np.ones(yy.size), yy.ravel(), xx.ravel()], 1)
    fg = np.zeros(yy.size, bool)
    for _ in range(3):  # fit the background gradient as a plane, excluding the shapes
        coef = np.linalg.lstsq(design[~fg], img.reshape(-1, 3)[~fg], rcond=None)[0]
        fg = np.linalg.norm(img.reshape(-1, 3) - design @ coef, axis=1) > 40
    return int(ndimage.label(fg.reshape(yy.shape))[1])


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_answers_readable_from_pixels(task, rows):
    """A simple pixel rule answers (nearly) every row: the answer is in the pixels, not the text."""
    val = rows[task]["val"][:48]
    if task == "Counting":
        ok = [str(_counting_oracle(r)) == r["choices"][letter_index(r)] for r in val]
        lum = [np.asarray(r["image_1"], float).mean() for r in rows[task]["train"]]
        count = [int(r["choices"][letter_index(r)]) for r in rows[task]["train"]]
        assert abs(np.corrcoef(lum, count)[0, 1]) < 0.3  # brightness does not give the count away
    else:
        oracle = {"Jigsaw": _jigsaw_oracle, "Visual_Similarity": _similarity_oracle,
                  "Relative_Reflectance": _reflectance_oracle, "Object_Localization": _localization_oracle}[task]
        ok = [oracle(r) == letter_index(r) for r in val]
    assert np.mean(ok) >= 0.9, (task, np.mean(ok))


# ----------------------------------------------------------------------------------------- make_synthetic
def _json(path):
    with open(path) as f:
        return json.load(f)


def test_make_synthetic_round_trip_parquet_and_cache(tmp_path):
    from datasets import load_from_disk

    sizes = {"train": 6, "val": 3, "test": 3}
    out = tmp_path / "syn"
    paths = make_synthetic(str(out), ["Counting", "Jigsaw"], sizes, seed=3, parquet=True, progress=False,
                           max_count=5, same_palette=True)
    assert set(paths) == {"Counting", "Jigsaw"}
    for task, path in paths.items():
        dd = load_from_disk(path)
        assert set(dd) == set(sizes) and dd["train"].features == features()
        opts = {"max_count": 5} if task == "Counting" else {"same_palette": True}
        for split, n in sizes.items():
            want = generate_task(task, n, seed=3, split=split, **opts)
            assert [row_key(r) for r in dd[split]] == [row_key(r) for r in want]
            assert os.path.isfile(os.path.join(path, f"{split}.parquet"))
        rec = _json(os.path.join(path, "livr_synthetic.json"))
        assert rec["seed"] == 3 and rec["options"] == opts
        assert [row_key(r) for r in load_blink(task, "val", str(out))] == [row_key(r) for r in dd["val"]]
    # the parquet export loads too
    (tmp_path / "pq" / "Jigsaw").mkdir(parents=True)
    shutil.copy(os.path.join(paths["Jigsaw"], "val.parquet"), tmp_path / "pq" / "Jigsaw" / "val.parquet")
    pq = load_blink("Jigsaw", "val", str(tmp_path / "pq"))
    assert [row_key(r) for r in pq] == [row_key(r) for r in generate_task("Jigsaw", 3, seed=3, split="val",
                                                                           same_palette=True)]
    # an identical request is skipped (nothing rewritten); a different one regenerates
    stamp = os.stat(os.path.join(paths["Counting"], "dataset_dict.json")).st_mtime_ns
    inode = os.stat(paths["Counting"]).st_ino
    make_synthetic(str(out), ["Counting"], sizes, seed=3, parquet=True, progress=False, max_count=5)
    assert os.stat(paths["Counting"]).st_ino == inode
    assert os.stat(os.path.join(paths["Counting"], "dataset_dict.json")).st_mtime_ns == stamp
    make_synthetic(str(out), ["Counting"], sizes, seed=4, progress=False, max_count=5)
    assert _json(os.path.join(paths["Counting"], "livr_synthetic.json"))["seed"] == 4
    assert not os.path.exists(os.path.join(paths["Counting"], "val.parquet"))
    assert sorted(p.name for p in out.iterdir()) == ["Counting", "Jigsaw"]  # no temp dirs left
    # per-task options, and an option no task takes
    make_synthetic(str(out), ["Counting"], {"train": 4}, progress=False, Counting={"mode": "open"})
    assert load_from_disk(paths["Counting"])["train"][0]["choices"] == []
    with pytest.raises(DataError, match="bogus"):
        make_synthetic(str(out), ["Counting", "Jigsaw"], {"train": 2}, progress=False, bogus=1)


# ----------------------------------------------------------------------------------------- loader
def _write(rows, root, task="Counting", split="val", kind="parquet"):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(rows, features=features())
    os.makedirs(os.path.join(root, task), exist_ok=True)
    if kind == "parquet":
        ds.to_parquet(os.path.join(root, task, f"{split}.parquet"))
    else:
        DatasetDict({split: ds}).save_to_disk(os.path.join(root, task))
    return str(root)


def test_load_blink_local_layouts(tmp_path):
    rows = generate_task("Counting", 5, seed=0, split="val")
    want = [row_key(r) for r in rows]
    for kind in ("parquet", "disk"):
        root = _write(rows, tmp_path / kind, kind=kind)
        ds = load_blink("Counting", "val", root)
        assert [row_key(r) for r in ds] == want and ds.column_names == list(COLUMNS)
        assert len(load_blink("Counting", "val", root, limit=2)) == 2
    # a root-level parquet file, without image_2..4 / prompt columns: they are added
    from datasets import Dataset

    ds = Dataset.from_list(rows, features=features()).remove_columns(["image_2", "image_3", "image_4", "prompt"])
    ds.to_parquet(str(tmp_path / "val.parquet"))
    got = load_blink("Counting", "val", str(tmp_path))
    assert got[0]["image_4"] is None and got[0]["prompt"] == "" and pixels(got[0]["image_1"]) == pixels(rows[0]["image_1"])
    assert format_prompt(got[0]) == rows[0]["prompt"]
    with pytest.raises(DataError, match="split 'test'"):
        load_blink("Counting", "test", str(tmp_path / "disk"))
    with pytest.raises(DataError, match="no data"):
        load_blink("Jigsaw", "val", str(tmp_path / "disk"))
    with pytest.raises(DataError, match="Counting, Jigsaw"):
        load_blink("Countin", "val", str(tmp_path))
    # open-ended rows, and BLINK's hidden test answers
    open_rows = generate_task("Counting", 3, seed=0, split="test", mode="open")
    assert len(load_blink("Counting", "test", _write(open_rows, tmp_path / "open", split="test"))) == 3
    hidden = [dict(r, answer="hidden") for r in rows]
    assert len(load_blink("Counting", "test", _write(hidden, tmp_path / "hidden", split="test"))) == 5


BAD = {
    "empty question": ("Counting", lambda r: r.update(question="  "), "empty question"),
    "answer outside": ("Counting", lambda r: r.update(answer="(E)"), "answer '(E)' is not among the 4 choices (A)-(D)"),
    "missing image_1": ("Counting", lambda r: r.update(image_1=None), "image_1 is missing"),
    "undecodable": ("Counting", lambda r: r.update(image_1={"bytes": b"garbage, not a PNG", "path": None}),
                    "image_1 cannot be decoded"),
    "image gap": ("Jigsaw", lambda r: r.update(image_2=None), "image_3 is present but image_2 is missing"),
    "open empty answer": ("Counting", lambda r: r.update(choices=[], answer=""), "empty answer"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("kind", ["parquet", "disk"])
def test_bad_rows_rejected(case, kind, tmp_path):
    task, spoil, msg = BAD[case]
    rows = generate_task(task, 4, seed=0, split="val")
    spoil(rows[2])
    root = _write(rows, tmp_path, task=task, kind=kind)
    with pytest.raises(DataError) as e:
        load_blink(task, "val", root)
    text = str(e.value)
    assert f"{task}/val" in text and f"idx={task}_val_2" in text and msg in text and "\n" not in text, text
    assert len(load_blink(task, "val", root, validate=False)) == 4


# ----------------------------------------------------------------------------------------- prompts
def test_parse_answer_lenient_rules():  # BLINK's exact rule: tests/training/test_scoring.py
    cases = {"A": "A", "(A)": "A", " (B) ": "B", "The answer is (C).": "C", "(A) or (B)": None, "E": None,
             "(E)": None, "": None, "a": None, "(a)": None, "B.": None, "I think (A) or (B).\n\n(B) the blue box": "B",
             "(D) 4": "D", "(B) B is darker (B)": "B"}
    for out, want in cases.items():
        assert parse_answer(out, 4, "lenient") == want, out
    assert parse_answer("C", 2, "lenient") is None and parse_answer("(C) yes", 2, "lenient") is None
    assert choice_letters(3) == ["A", "B", "C"]


def test_targets_and_correctness():
    mc = {"question": "Q?", "choices": ["x", "y", "z"], "answer": "(B)", "prompt": ""}
    assert format_prompt(mc) == "Q?\nSelect from the following choices.\n(A) x\n(B) y\n(C) z"
    assert target_text(mc) == "B" and target_text(mc, "paren") == "(B)"
    assert is_correct("B", mc) and is_correct("(B) y", mc) and not is_correct("A", mc) and not is_correct("", mc)
    op = {"question": "How many?", "choices": [], "answer": "3", "prompt": ""}
    assert format_prompt(op) == "How many?\nAnswer with a number."
    assert target_text(op) == "3" and target_text(op, "paren") == "3"
    assert is_correct("3", op) and is_correct("There are 3 shapes, not 4.", op, "lenient")
    assert not is_correct("4 or 3", op, "lenient")
    assert not is_correct("There are 3 shapes, not 4.", op) and is_correct("three", op) and not is_correct("three", op, "lenient")
    with pytest.raises(DataError):
        target_text(mc, "word")
    with pytest.raises(DataError):
        target_text(dict(mc, answer="(D)"))
