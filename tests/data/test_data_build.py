"""livr data build: each builder on a tiny fixture in its source's official layout (generated images, annotation
files in the authors' formats). Checks: the BLINK loader accepts the output; the construction's truth, computed
here from the pixels and the fixture's own annotations; balanced answers; determinism; split disjointness;
--exclude of planted (re-encoded, resized) duplicates; one-line errors naming the bad file."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from livr.cli import main
from livr.data.blink import load_blink
from livr.data.build import build, describe
from livr.data.tasks import DataError


# --------------------------------------------------------------------------------------------- helpers
def picture(seed: int, w: int, h: int) -> Image.Image:
    """A smooth random colour picture: distinct pHash per seed, and no flat regions (patches are unique)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    big = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8))


def save(img: Image.Image, path: str, **kw) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kw)
    return path


def arr(value) -> np.ndarray:
    """A loaded image cell (PIL image from datasets) as an int array."""
    return np.asarray(value.convert("RGB"), dtype=np.int16)


def provenance(out: str, task: str, split: str) -> list[dict]:
    with open(os.path.join(out, task, "provenance", f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


def manifest(out: str, task: str) -> dict:
    with open(os.path.join(out, task, "livr_build.json")) as f:
        return json.load(f)


def rows(out: str, task: str, split: str) -> list[dict]:
    return list(load_blink(task, split, source=out))


def assert_balanced(rs: list[dict], k: int) -> None:
    c = Counter(r["answer"] for r in rs)
    assert len(c) == k and max(c.values()) - min(c.values()) <= 1, c


def assert_disjoint(out: str, task: str, splits=("train", "val", "test")) -> None:
    seen = {s: {i for p in provenance(out, task, s) for i in p["images"]}
            for s in splits if os.path.exists(os.path.join(out, task, "provenance", f"{s}.jsonl"))}
    names = list(seen)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not seen[names[a]] & seen[names[b]], (names[a], names[b])


def plant_duplicate(src_path: str, exclude_dir: str, name: str) -> None:
    """A re-encoded (JPEG q40), resized (85%), brightened (+8%) copy of a source image: a few bits of pHash
    away from the original (an exact-hash match would miss it)."""
    from PIL import ImageEnhance

    img = Image.open(src_path).convert("RGB")
    img = ImageEnhance.Brightness(img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.BILINEAR))
    save(img.enhance(1.08), os.path.join(exclude_dir, name), format="JPEG", quality=40)


def plant_parquet_duplicate(src_path: str, exclude_dir: str) -> None:
    """A copy inside a BLINK-style parquet file (image column as {bytes, path}), as a local BLINK copy holds it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.open(src_path).convert("RGB").save(buf, format="JPEG", quality=85)
    t = pa.Table.from_pylist([{"idx": "val_Jigsaw_1", "image_1": {"bytes": buf.getvalue(), "path": None}}])
    os.makedirs(os.path.join(exclude_dir, "Jigsaw"), exist_ok=True)
    pq.write_table(t, os.path.join(exclude_dir, "Jigsaw", "val-00000-of-00001.parquet"))


def same_output(out1: str, out2: str, task: str) -> bool:
    a = [json.dumps({k: v for k, v in p.items()}, sort_keys=True) for p in provenance(out1, task, "train")]
    b = [json.dumps({k: v for k, v in p.items()}, sort_keys=True) for p in provenance(out2, task, "train")]
    return a == b and [r["answer"] for r in rows(out1, task, "train")] == [r["answer"] for r in rows(out2, task, "train")]


# --------------------------------------------------------------------------------------------- Counting
def pixmo_fixture(root: str) -> dict:
    """PixMo-Count as on the hub (data/<split>-00000-of-00001.parquet) + images/<sha256>.jpg; returns
    {decoded-pixel digest: count}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    truth, seed = {}, 0
    for split, per in (("train", 2), ("validation", 1), ("test", 1)):
        recs = []
        for count in [*range(2, 11)] * per + [0, 14]:  # 0 and 14 are outside 2..10: never used
            seed += 1
            buf = io.BytesIO()
            picture(seed, 72, 64).save(buf, format="JPEG", quality=90)
            sha = hashlib.sha256(buf.getvalue()).hexdigest()
            with open(save(Image.new("RGB", (1, 1)), os.path.join(root, "images", f"{sha}.jpg")), "wb") as f:
                f.write(buf.getvalue())
            truth[hashlib.md5(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).tobytes()).hexdigest()] = count
            recs.append({"image_url": f"https://example.org/{seed}.jpg", "image_sha256": sha, "count": count,
                         "points": [{"x": 1.0, "y": 2.0}] * count, "label": "apples"})
        recs.append({"image_url": "https://example.org/dead.jpg", "image_sha256": "ab" * 32, "count": 3,
                     "points": [], "label": "pears"})  # a dead URL: no image downloaded
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(recs), os.path.join(root, "data", f"{split}-00000-of-00001.parquet"))
    return truth


def test_counting(tmp_path):
    src, out = str(tmp_path / "pixmo"), str(tmp_path / "out")
    truth = pixmo_fixture(src)
    m = build("Counting", src, out, train=9, val=9, test=9, seed=1, progress=False)
    assert m["counts"]["train"]["rows"] == 9
    for split in ("train", "val", "test"):
        rs = rows(out, "Counting", split)
        assert len(rs) == 9
        for r in rs:
            assert r["choices"] == [] and r["prompt"].endswith("Answer with a number.")
            digest = hashlib.md5(np.asarray(r["image_1"].convert("RGB")).tobytes()).hexdigest()
            assert str(truth[digest]) == r["answer"]  # the answer is the source row's count
        assert sorted(int(r["answer"]) for r in rs) == list(range(2, 11))  # counts balanced
    assert_disjoint(out, "Counting")


# --------------------------------------------------------------------------------------------- COCO
def coco_fixture(root: str, n_train: int = 8, n_val: int = 8, *, annotations: bool = True) -> dict:
    """COCO 2017 layout: {train,val}2017/<12-digit id>.jpg and annotations/instances_<pool>.json."""
    boxes, seed = {}, 100
    for pool, n in (("train2017", n_train), ("val2017", n_val)):
        images, anns = [], []
        for i in range(n):
            seed += 1
            iid = seed
            W, H = 160, 120
            name = f"{iid:012d}.jpg"
            save(picture(seed, W, H), os.path.join(root, pool, name), format="PNG")  # PNG bytes, .jpg name: exact pixels
            images.append({"id": iid, "file_name": name, "width": W, "height": H})
            bw, bh = 80 + (i % 3) * 8, 60 + (i % 2) * 6  # 25-33% of the image
            x, y = 10 + i % 4 * 5, 12 + i % 3 * 4
            anns.append({"id": 1000 + iid, "image_id": iid, "category_id": 3, "iscrowd": 0,
                         "bbox": [x, y, bw, bh], "area": 0.8 * bw * bh, "segmentation": []})
            anns.append({"id": 2000 + iid, "image_id": iid, "category_id": 3, "iscrowd": 1,
                         "bbox": [0, 0, 100, 80], "area": 8000, "segmentation": {}})  # crowd: ignored
            anns.append({"id": 3000 + iid, "image_id": iid, "category_id": 3, "iscrowd": 0,
                         "bbox": [0, 0, 10, 10], "area": 100, "segmentation": []})  # < 15%: ignored
            boxes[(pool, iid)] = [x, y, x + bw, y + bh]
        if pool == "train2017":  # one annotation whose box leaves the image: skipped and counted
            anns.append({"id": 9999, "image_id": images[0]["id"], "category_id": 3, "iscrowd": 0,
                         "bbox": [100, 50, 90, 60], "area": 0.9 * 90 * 60, "segmentation": []})
        if annotations:
            os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
            with open(os.path.join(root, "annotations", f"instances_{pool}.json"), "w") as f:
                json.dump({"images": images, "annotations": anns, "categories": [{"id": 3, "name": "car"}]}, f)
    return boxes


def test_jigsaw_cli_truth_balance_exclude(tmp_path, capsys):
    src, out, ex = str(tmp_path / "coco"), str(tmp_path / "out"), str(tmp_path / "blink")
    coco_fixture(src, n_train=10, n_val=8, annotations=False)
    plant_duplicate(os.path.join(src, "train2017", f"{101:012d}.jpg"), ex, "dup.jpg")
    plant_parquet_duplicate(os.path.join(src, "train2017", f"{102:012d}.jpg"), ex)
    with open(os.path.join(src, "train2017", "999999999999.jpg"), "wb") as f:
        f.write(b"not an image")  # unreadable: skipped with a count
    rc = main(["data", "build", "Jigsaw", "--source", src, "--out", out, "--train", "20", "--val", "4",
               "--test", "4", "--seed", "3", "--exclude", ex, "--workers", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    c = manifest(out, "Jigsaw")["counts"]
    assert c["train"]["excluded (near-duplicate of --exclude)"] == 2 and "excluded (near-duplicate" in text
    assert c["train"]["unreadable image"] == 1
    assert c["train"]["rows"] == 8  # 10 good images, the two planted duplicates dropped
    assert all(f"{k:012d}" not in f for p in provenance(out, "Jigsaw", "train") for f in p["files"] for k in (101, 102))
    originals = {p: arr(Image.open(os.path.join(src, p))) for pool in ("train2017", "val2017")
                 for p in [f"{pool}/{n}" for n in os.listdir(os.path.join(src, pool)) if n != "999999999999.jpg"]}
    for split in ("train", "val", "test"):
        rs = rows(out, "Jigsaw", split)
        if split != "train":
            assert_balanced(rs, 2)
        for r in rs:
            canvas, cands = arr(r["image_1"]), [arr(r["image_2"]), arr(r["image_3"])]
            ch, cw = canvas.shape[:2]
            assert (canvas[ch // 2:, cw // 2:] == 0).all()  # bottom-right quadrant blacked out
            hits = []
            for o in originals.values():  # locate the crop in its source image, from pixels only
                H, W = o.shape[:2]
                for y in range(H - ch + 1):
                    for x in range(W - cw + 1):
                        if (o[y:y + ch // 2, x:x + cw] == canvas[:ch // 2]).all():
                            hits.append(o[y + ch // 2:y + ch, x + cw // 2:x + cw])
            assert len(hits) == 1
            k = "AB".index(r["answer"][1])
            assert (cands[k] == hits[0]).all() and not (cands[1 - k] == hits[0]).all()
    assert_disjoint(out, "Jigsaw")
    # same request: up to date, not rebuilt; same seed elsewhere: identical; another seed: different
    assert main(["data", "build", "Jigsaw", "--source", src, "--out", out, "--train", "20", "--val", "4",
                 "--test", "4", "--seed", "3", "--exclude", ex]) == 0
    assert "up to date" in capsys.readouterr().out
    out2, out3 = str(tmp_path / "out2"), str(tmp_path / "out3")
    build("Jigsaw", src, out2, train=20, val=4, test=4, seed=3, exclude=[ex], progress=False)
    build("Jigsaw", src, out3, train=20, val=4, test=4, seed=4, exclude=[ex], progress=False)
    assert same_output(out, out2, "Jigsaw") and not same_output(out, out3, "Jigsaw")
    assert not [d for d in os.listdir(out) if d.startswith(".")]  # no temp dir left


def test_localization_truth(tmp_path):
    src, out = str(tmp_path / "coco"), str(tmp_path / "out")
    boxes = coco_fixture(src, n_train=8, n_val=8)
    m = build("Object_Localization", src, out, train=20, val=4, test=4, seed=5, progress=False)
    assert m["counts"]["train"]["box outside the image"] == 1 and m["counts"]["train"]["rows"] == 8
    red, blue = np.array([255, 0, 0]), np.array([0, 90, 255])
    from livr.data.build.coco import iou

    for split in ("train", "val", "test"):
        rs, ps = rows(out, "Object_Localization", split), provenance(out, "Object_Localization", split)
        assert_balanced(rs, 2)
        for r, p in zip(rs, ps):
            pool, iid = p["images"][0].split("/")
            true = boxes[(pool, int(iid))]
            assert p["box"] == true  # the gold box is the annotation's
            assert 0.15 <= (true[2] - true[0]) * (true[3] - true[1]) / (160 * 120) <= 0.5
            assert 0.2 <= iou(true, p["distractor"]) <= 0.5
            img = arr(r["image_1"])
            colour = red if r["answer"] == "(A)" else blue  # A is drawn red, B blue
            x0, y0, x1, y1 = (round(v) for v in true)
            assert (img[(y0 + y1) // 2, x0] == colour).all() and (img[(y0 + y1) // 2, x1] == colour).all()
            assert "localizes and encloses the car?" in r["prompt"] and r["choices"] == ["Box A", "Box B"]
    assert_disjoint(out, "Object_Localization")


def test_bad_sources_one_line_errors(tmp_path, capsys):
    src = str(tmp_path / "coco")
    coco_fixture(src, n_train=2, n_val=2, annotations=False)
    rc = main(["data", "build", "Object_Localization", "--source", src, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "instances_train2017.json" in err and "missing annotation file" in err
    rc = main(["data", "build", "Counting", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nope" in err
    with pytest.raises(DataError, match="no builder yet|unknown task"):
        build("Relative_Depth", src, str(tmp_path / "o"))
    assert main(["data", "build", "--list"]) == 0
    listing = capsys.readouterr().out
    assert listing == describe() and all(t in listing for t in ("Counting", "Jigsaw", "Visual_Similarity"))


# --------------------------------------------------------------------------------------------- ArtBench, NIGHTS
def test_art_style(tmp_path):
    src, out = str(tmp_path / "artbench"), str(tmp_path / "out")
    styles, seed = {}, 300
    for pool, per in (("train", 6), ("test", 3)):
        for style in ("baroque", "impressionism", "ukiyo_e"):
            for i in range(per):
                seed += 1
                p = save(picture(seed, 64, 64), os.path.join(src, pool, style, f"{style}_{i}.jpg"), format="PNG")
                styles[arr(Image.open(p)).tobytes()] = (pool, style)
    build("Art_Style", src, out, train=6, val=4, test=4, seed=2, progress=False)
    for split in ("train", "val", "test"):
        rs = rows(out, "Art_Style", split)
        assert_balanced(rs, 2)
        for r in rs:
            ref, c2, c3 = (styles[arr(r[c]).tobytes()] for c in ("image_1", "image_2", "image_3"))
            right, wrong = (c2, c3) if r["answer"] == "(A)" else (c3, c2)
            assert right[1] == ref[1] and wrong[1] != ref[1]  # the correct candidate shares the style
            assert arr(r["image_1"]).tobytes() != arr(r["image_2"]).tobytes()
            assert {ref[0], c2[0], c3[0]} == {"test" if split == "test" else "train"}
    assert_disjoint(out, "Art_Style")


def test_visual_similarity(tmp_path):
    src, out = str(tmp_path / "nights"), str(tmp_path / "out")
    lines, truth, seed = ["id,votes,right_vote,prompt,ref_path,left_path,right_path,split,is_imagenet"], {}, 500
    for n, split in enumerate(["train"] * 6 + ["val"] * 4 + ["test"] * 4 + ["train"]):
        paths = [f"ref/000/{n:03d}.png", f"distort/000/{n:03d}_0.png", f"distort/000/{n:03d}_1.png"]
        for p in paths:
            seed += 1
            save(picture(seed, 64, 64), os.path.join(src, p))
        right = 0.0 if n % 3 else 1.0
        votes = 3 if n == 14 else 6  # the last triplet has too few votes: dropped
        lines.append(f"{n},{votes},{right},a dog,{paths[0]},{paths[1]},{paths[2]},{split},False")
        truth[n] = paths[2] if right > 0.5 else paths[1]
    with open(os.path.join(src, "data.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    m = build("Visual_Similarity", src, out, train=10, val=4, test=4, seed=0, progress=False)
    assert m["counts"]["train"]["rows"] == 6
    for split in ("train", "val", "test"):
        rs = rows(out, "Visual_Similarity", split)
        if split != "train":
            assert_balanced(rs, 2)
        for r in rs:
            n = next(k for k in truth if (arr(Image.open(os.path.join(src, f"ref/000/{k:03d}.png"))) == arr(r["image_1"])).all())
            chosen = r["image_2"] if r["answer"] == "(A)" else r["image_3"]
            assert (arr(Image.open(os.path.join(src, truth[n]))) == arr(chosen)).all()  # the human-preferred one
    assert_disjoint(out, "Visual_Similarity")


# --------------------------------------------------------------------------------------------- correspondences
def ring_is_red(img: np.ndarray, pt, scale: float) -> bool:
    """Some pixel on the marker circle around pt is pure red."""
    r = max(4.0, scale * 0.6)
    for a in np.linspace(0, 2 * np.pi, 24, endpoint=False):
        x, y = round(pt[0] + r * np.cos(a)), round(pt[1] + r * np.sin(a))
        if 0 <= y < img.shape[0] and 0 <= x < img.shape[1] and (img[y, x] == [255, 0, 0]).all():
            return True
    return False


def hpatches_fixture(root: str) -> dict:
    """hpatches-sequences-release/<v_*|i_*>/{1..6}.ppm + H_1_{2..6}; returns {seq: {k: H_1_k}}."""
    rng, Hs, seed = np.random.default_rng(0), {}, 700
    for s in [f"v_seq{k}" for k in range(10)] + ["i_light0", "i_light1"]:
        d = os.path.join(root, "hpatches-sequences-release", s)
        Hs[s] = {1: np.eye(3)}
        for k in range(1, 7):
            seed += 1
            save(picture(seed, 96, 72), os.path.join(d, f"{k}.ppm"))
            if k > 1:
                H = np.eye(3) + np.diag([rng.uniform(-0.1, 0.1)] * 2 + [0])
                H[0, 2], H[1, 2], H[2, :2] = rng.uniform(-5, 5), rng.uniform(-5, 5), rng.uniform(-2e-4, 2e-4, 2)
                np.savetxt(os.path.join(d, f"H_1_{k}"), H)
                Hs[s][k] = H
    return Hs


def test_visual_correspondence(tmp_path):
    src, out = str(tmp_path / "hp"), str(tmp_path / "out")
    Hs = hpatches_fixture(src)
    build("Visual_Correspondence", src, out, train=12, val=8, test=8, seed=7, progress=False)
    for split in ("train", "val", "test"):
        rs, ps = rows(out, "Visual_Correspondence", split), provenance(out, "Visual_Correspondence", split)
        assert_balanced(rs, 4)
        for r, p in zip(rs, ps):
            seq, i = p["images"][0].split("/")
            j = p["images"][1].split("/")[1]
            H = Hs[seq][int(j)] @ np.linalg.inv(Hs[seq][int(i)])  # computed here, from the fixture
            v = H @ np.array([*p["ref"], 1.0])
            k = "ABCD".index(r["answer"][1])
            assert np.hypot(*(v[:2] / v[2] - np.array(p["candidates"][k]))) < 1.0
            others = [c for n, c in enumerate(p["candidates"]) if n != k]
            assert all(np.hypot(*(np.array(c) - v[:2] / v[2])) > 5 for c in others)
            img = arr(r["image_2"])
            assert all(ring_is_red(img, c, max(img.shape[:2]) / 40) for c in p["candidates"])
            assert ring_is_red(arr(r["image_1"]), p["ref"], 96 / 40)
            assert "Select from the following options." in r["prompt"]
    assert_disjoint(out, "Visual_Correspondence")
    seqs = {s: {p["images"][0].split("/")[0] for p in provenance(out, "Visual_Correspondence", s)}
            for s in ("train", "val", "test")}
    assert not (seqs["train"] & seqs["val"] or seqs["train"] & seqs["test"] or seqs["val"] & seqs["test"])


def spair_fixture(root: str) -> dict:
    """SPair-71k: PairAnnotation/{trn,test}/<id>-<src>-<trg>:<cat>.json + JPEGImages/<cat>/<name>.jpg; trn pairs
    share images (every pair of 12 images), as SPair's do."""
    rng, anns, seed = np.random.default_rng(1), {}, 900
    kp = lambda m: [[float(rng.uniform(5, 115)), float(rng.uniform(5, 85))] for _ in range(m)]

    def image() -> str:
        nonlocal seed
        seed += 1
        save(picture(seed, 120, 90), os.path.join(root, "JPEGImages", "cat", f"2008_{seed:06d}.jpg"), format="PNG")
        return f"2008_{seed:06d}.jpg"

    trn = [image() for _ in range(12)]
    pairs = [("trn", trn[i], trn[j]) for i in range(12) for j in range(i + 1, 12)]
    pairs += [("test", image(), image()) for _ in range(5)]
    for n, (pool, s, t) in enumerate(pairs, start=1):
        a = {"src_imname": s, "trg_imname": t, "category": "cat", "src_kps": kp(6), "trg_kps": kp(6),
             "kps_ids": list(range(6)), "src_imsize": [120, 90, 3], "trg_imsize": [120, 90, 3]}
        if pool == "test" and not anns.get("bad"):
            a["trg_kps"] = a["trg_kps"][:3]  # too few correspondences: skipped
            anns["bad"] = True
        path = os.path.join(root, "PairAnnotation", pool, f"{n:06d}-{s[:-4]}-{t[:-4]}:cat.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(a, f)
        anns[(s, t)] = a
    return anns


def test_semantic_correspondence(tmp_path):
    src, out = str(tmp_path / "spair"), str(tmp_path / "out")
    anns = spair_fixture(src)
    m = build("Semantic_Correspondence", src, out, train=8, val=4, test=4, seed=1, progress=False)
    assert m["counts"]["test"]["fewer than 4 valid keypoints"] == 1 and m["counts"]["test"]["rows"] == 4
    assert not any(c.get("cross-split image overlap") for c in m["counts"].values())  # trn split by image
    for split in ("train", "val", "test"):
        rs, ps = rows(out, "Semantic_Correspondence", split), provenance(out, "Semantic_Correspondence", split)
        assert len(rs) == 4 if split != "train" else len(rs) == 8
        assert_balanced(rs, 4)
        for r, p in zip(rs, ps):
            a = anns[tuple(i.split("/")[1] for i in p["images"])]
            assert (a in [anns[k] for k in anns if k != "bad"]) and ("/trn/" in p["files"][2]) == (split != "test")
            j = a["src_kps"].index(p["ref"])
            k = "ABCD".index(r["answer"][1])
            assert p["candidates"][k] == a["trg_kps"][j]  # the annotated match, at the answer's letter
            assert all(c in a["trg_kps"] for c in p["candidates"])
            assert ring_is_red(arr(r["image_2"]), p["candidates"][k], 120 / 40)
    assert_disjoint(out, "Semantic_Correspondence")


# --------------------------------------------------------------------------------------------- MID
def mid_fixture(root: str) -> None:
    """MID scene folders (train/<scene>/dir_<k>_mip2.jpg) with MIDIntrinsics' albedo.png: blocks of albedo
    levels, some within 10% of each other (0.50 / 0.53), some far apart (0.2 / 0.8)."""
    levels, seed = np.array([0.2, 0.5, 0.53, 0.6, 0.8, 0.52, 0.21]), 1100  # 0.5 vs 0.6: rel 0.17
    for pool, scenes in (("train", 4), ("test", 2)):
        for s in range(scenes):
            d = os.path.join(root, pool, f"scene{s}_{pool}")
            rng = np.random.default_rng(s + (10 if pool == "test" else 0))
            grid = levels[rng.integers(0, len(levels), (4, 6))]
            alb = np.kron(grid, np.ones((24, 24)))  # 96 x 144, constant 24-px blocks
            save(Image.fromarray((np.repeat(alb[..., None], 3, 2) * 255).round().astype(np.uint8)),
                 os.path.join(d, "albedo.png"))
            for k in range(4):
                seed += 1
                save(picture(seed, 144, 96), os.path.join(d, f"dir_{k}_mip2.jpg"), format="PNG")


def test_relative_reflectance(tmp_path):
    src, out = str(tmp_path / "mid"), str(tmp_path / "out")
    mid_fixture(src)
    build("Relative_Reflectance", src, out, train=8, val=4, test=8, seed=4, progress=False)
    def disk_mean(Y, x, y, r):  # written here, not imported: the rule is checked independently
        yy, xx = np.mgrid[0:Y.shape[0], 0:Y.shape[1]]
        return Y[(xx - x) ** 2 + (yy - y) ** 2 <= r * r].mean()

    for split in ("train", "val", "test"):
        rs, ps = rows(out, "Relative_Reflectance", split), provenance(out, "Relative_Reflectance", split)
        if split != "val":  # A : B : C = 3 : 3 : 2 per block of 8 ("About the same" a quarter, as the paper)
            assert Counter(r["answer"] for r in rs) == {"(A)": 3, "(B)": 3, "(C)": 2}
        for r, p in zip(rs, ps):
            alb = np.asarray(Image.open(p["files"][1]).convert("RGB"), dtype=float) / 255
            Y = alb @ np.array([0.2126, 0.7152, 0.0722])
            ya, yb = (disk_mean(Y, *p[k], max(2.0, 0.01 * 144)) for k in ("A", "B"))
            rel = abs(ya - yb) / max(ya, yb)
            want = "(C)" if rel <= 0.10 else ("(A)" if ya < yb else "(B)")  # the 0.10 rule
            assert r["answer"] == want
            img = arr(r["image_1"])
            assert ring_is_red(img, p["A"], 144 / 40) and ring_is_red(img, p["B"], 144 / 40)
    assert_disjoint(out, "Relative_Reflectance")


# --------------------------------------------------------------------------------------------- FunKPoint
def test_functional_correspondence(tmp_path):
    """FunKPoint as released: FunKPoint/labels.csv (p1_x..p5_y normalised, difficulty, image_path relative to the
    csv's folder, action, wnid, object_category) + FunKPoint/images/<wnid>/<file>.jpg; some images have 2 actions."""
    src, out = str(tmp_path / "funk"), str(tmp_path / "out")
    root = os.path.join(src, "FunKPoint")
    rng, lines, kps, seed = np.random.default_rng(3), [], {}, 1300
    header = ",".join(f"p{i}_{a}" for i in range(1, 6) for a in "xy") + ",difficulty,image_path,action,wnid,object_category"
    for action in ("Pour", "Mash/Pound"):
        for n in range(20):
            seed += 1
            rel = f"images/n0{seed}/{n:04d}.jpg"
            if action == "Pour" or n >= 4:  # the first 4 Mash/Pound rows reuse Pour images: one image, 2 actions
                save(picture(seed, 80, 60), os.path.join(root, rel), format="PNG")
            else:
                rel = next(r for (r, a) in kps if a == "Pour" and r.endswith(f"/{n:04d}.jpg"))
            pts = [(0.1 + 0.2 * i + rng.uniform(-0.05, 0.05), rng.uniform(0.1, 0.9)) for i in range(5)]
            kps[(rel, action)] = [(x * 79, y * 59) for x, y in pts]
            lines.append(",".join(f"{v:.6f}" for p in pts for v in p) + f",easy,{rel},{action},n0{seed},pot")
    with open(os.path.join(root, "labels.csv"), "w") as f:
        f.write("\n".join([header, *lines]) + "\n")
    m = build("Functional_Correspondence", src, out, train=8, val=2, test=2, seed=9, progress=False)
    assert not any(c.get("cross-split image overlap") for c in m["counts"].values())  # split by image, not row
    from livr.data.build import funkpoint
    from livr.data.build.driver import partition

    spec, where = funkpoint.FUNCTIONAL, {}
    for seed in range(5):  # the 4 two-action images: each goes to one split with all its actions
        parts = partition(spec["scan"](src), spec["splits"], {"train": 8, "val": 2, "test": 2}, seed, "F",
                          spec["fractions"])
        for split, units in parts.items():
            for u in units:
                assert where.setdefault((seed, u["group"]), split) == split
    split_of = {}
    for split in ("train", "val", "test"):
        rs, ps = rows(out, "Functional_Correspondence", split), provenance(out, "Functional_Correspondence", split)
        if split == "train":
            assert_balanced(rs, 4)
        for i in (i for p in ps for i in p["images"]):
            assert split_of.setdefault(i, split) == split  # an image (with all its actions) in one split
        used = [(i, p["action"]) for p in ps for i in p["images"]]
        assert len(used) == len(set(used))  # each image in at most one pair per action
        for r, p in zip(rs, ps):
            src_pts, trg_pts = kps[(p["images"][0], p["action"])], kps[(p["images"][1], p["action"])]
            assert f'action: "{p["action"]}"' in r["prompt"]
            k = p["keypoint"] - 1
            assert np.allclose(p["ref"], src_pts[k], atol=1e-3)
            cand = p["candidates"]["ABCD".index(r["answer"][1])]
            assert np.allclose(cand, trg_pts[k], atol=1e-3)  # the same functional keypoint, at the answer
            assert all(any(np.allclose(c, t, atol=1e-3) for t in trg_pts) for c in p["candidates"])
    assert_disjoint(out, "Functional_Correspondence")


def test_interrupted_build_leaves_nothing_loadable(tmp_path, monkeypatch):
    from livr.data.build import coco

    src, out = str(tmp_path / "coco"), str(tmp_path / "out")
    coco_fixture(src, n_train=6, n_val=4, annotations=False)
    stale = os.path.join(out, ".Jigsaw.tmp-4194000-killed")  # what a killed build (no cleanup) leaves
    os.makedirs(os.path.join(stale, "train"))
    calls = []

    def dies(sample, label):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return coco.render_jigsaw(sample, label)

    monkeypatch.setitem(coco.JIGSAW, "render", dies)
    with pytest.raises(KeyboardInterrupt):
        build("Jigsaw", src, out, train=4, val=2, test=2, progress=False)
    assert not os.path.exists(os.path.join(out, "Jigsaw"))
    with pytest.raises(DataError):
        load_blink("Jigsaw", "test", source=out)  # the half-written split is not loadable
    monkeypatch.setitem(coco.JIGSAW, "render", coco.render_jigsaw)
    build("Jigsaw", src, out, train=4, val=2, test=2, progress=False)  # restarts cleanly
    assert len(rows(out, "Jigsaw", "train")) == 4 and os.listdir(out) == ["Jigsaw"]
