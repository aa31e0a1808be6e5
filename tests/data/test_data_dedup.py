"""De-duplication against held-out images (livr.data.build.dedup, `livr data build --exclude/--clip`): BLINK-style
copies planted in a BLINK-layout parquet (boxes or points drawn on, resized, re-encoded JPEG, a swapped pair) are
dropped, a non-duplicate look-alike (the same low-frequency scene, other detail: pHash retrieves it, SSIM must
reject it) is kept. Also the CLIP retrieval stage (a tiny random CLIP saved locally) and one-line errors."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from livr.cli import main
from livr.data.build.common import PHASH_MAX_DISTANCE
from livr.data.build.dedup import ExcludeIndex, features, iter_examples, load_index


def scene(seed: int, texture: int | None = None, w: int = 256, h: int = 192) -> Image.Image:
    """A smooth layout (seed) plus mid-frequency detail (texture, default the same seed)."""
    base = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8))
    base = np.asarray(base.resize((w, h), Image.BICUBIC), dtype=np.float64)
    tex = Image.fromarray(np.random.default_rng(seed if texture is None else texture)
                          .integers(0, 256, (h // 6, w // 6), dtype=np.uint8))
    tex = np.asarray(tex.resize((w, h), Image.BICUBIC), dtype=np.float64)
    return Image.fromarray(np.clip(base * 0.7 + (tex[..., None] - 128) * 0.35 + 40, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, scale: float = 0.8, q: int = 70) -> Image.Image:
    buf = io.BytesIO()
    img.resize((int(img.width * scale), int(img.height * scale)), Image.BILINEAR).save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def boxes(img: Image.Image, width: int = 7) -> Image.Image:
    """BLINK Object_Localization style: two labelled boxes drawn on."""
    img, (w, h) = img.copy(), img.size
    d = ImageDraw.Draw(img)
    for (x0, y0, x1, y1), c in (((0.15, 0.2, 0.7, 0.8), (255, 0, 0)), ((0.3, 0.1, 0.9, 0.7), (0, 90, 255))):
        d.rectangle([x0 * w, y0 * h, x1 * w, y1 * h], outline=c, width=width)
        d.rectangle([x0 * w, y0 * h - 14, x0 * w + 14, y0 * h], fill=c)
    return img


def points(img: Image.Image) -> Image.Image:
    """BLINK point-task style: red circles with labels on white tags."""
    img = img.copy()
    d = ImageDraw.Draw(img)
    for x, y, label in ((60, 50, "A"), (170, 120, "B")):
        d.ellipse([x - 7, y - 7, x + 7, y + 7], outline=(255, 0, 0), width=3)
        d.rectangle([x + 9, y - 14, x + 22, y], fill=(255, 255, 255))
        d.text((x + 10, y - 14), label, fill=(255, 0, 0))
    return img


def write_blink(path: str, rows: list[list[Image.Image]]) -> str:
    """A BLINK-layout parquet: idx, image_1..image_4 as {bytes, path}, unused slots empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = []
    for n, imgs in enumerate(rows):
        rec = {"idx": f"val_{n}"}
        for k in range(4):
            buf = io.BytesIO()
            if k < len(imgs):
                imgs[k].save(buf, format="PNG")  # lossless: the copy as planted (jpeg() re-encodes)
            rec[f"image_{k + 1}"] = {"bytes": buf.getvalue(), "path": None} if k < len(imgs) else None
        recs.append(rec)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(recs), path)
    return path


def png(img: Image.Image, path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    return path


def bits(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def test_annotated_copies_dropped_lookalike_kept(tmp_path):
    o, o2 = scene(1), scene(2)
    src, src2, look = (png(im, str(tmp_path / f"src/{n}.png")) for n, im in
                       (("o", o), ("o2", o2), ("look", scene(1, texture=99))))
    box_copy, point_copy = jpeg(boxes(o), q=50), jpeg(points(o2))
    blink = write_blink(str(tmp_path / "blink/Object_Localization/val-00000-of-00001.parquet"),
                        [[box_copy], [point_copy], [scene(7)]])
    index = load_index([os.path.dirname(os.path.dirname(blink))])
    assert len(index) == 3
    f, fb, fl = features(o), features(box_copy), features(Image.open(look))
    assert int(index.phash[0]) == fb["phash"]
    assert bits(f["phash"], fb["phash"]) > PHASH_MAX_DISTANCE  # only the blurred-grayscale pass retrieves it
    assert index.duplicate([src], "annotated")  # boxes drawn, resized, JPEG: dropped
    assert not index.duplicate([src], "image")  # (the plain pass misses it)
    assert index.duplicate([src2], "annotated") and index.duplicate([src2], "image")  # points drawn on: dropped
    assert bits(f["phash"], fl["phash"]) <= PHASH_MAX_DISTANCE  # the look-alike is retrieved ...
    assert not index.duplicate([look], "annotated") and not index.duplicate([look], "image")  # ... SSIM keeps it


def test_pairs_both_images_aligned_or_swapped(tmp_path):
    s, t, x = scene(11), scene(12), scene(13)
    ps, pt = png(s, str(tmp_path / "s.png")), png(t, str(tmp_path / "t.png"))
    swapped = ExcludeIndex(iter_examples([os.path.dirname(write_blink(
        str(tmp_path / "a/val.parquet"), [[points(jpeg(t)), points(jpeg(s))]]))]))
    aligned = ExcludeIndex(iter_examples([os.path.dirname(write_blink(
        str(tmp_path / "b/val.parquet"), [[points(jpeg(s)), points(jpeg(t))]]))]))
    one = ExcludeIndex(iter_examples([os.path.dirname(write_blink(
        str(tmp_path / "c/val.parquet"), [[points(jpeg(s)), x]]))]))
    split = ExcludeIndex(iter_examples([os.path.dirname(write_blink(
        str(tmp_path / "d/val.parquet"), [[jpeg(s), x], [x, jpeg(t)]]))]))
    assert swapped.duplicate([ps, pt], "pair") and aligned.duplicate([ps, pt], "pair")
    assert not one.duplicate([ps, pt], "pair") and one.duplicate([ps, pt], "image")  # one shared image: kept
    assert not split.duplicate([ps, pt], "pair")  # both match, but in two different examples: kept


def test_all_images_of_an_example(tmp_path):
    ref, pos, neg, other = scene(21), scene(22), scene(23), scene(24)
    paths = [png(im, str(tmp_path / f"{n}.png")) for n, im in enumerate((ref, pos, neg))]
    index = ExcludeIndex(iter_examples([os.path.dirname(write_blink(
        str(tmp_path / "blink/val.parquet"), [[other, scene(25), jpeg(neg, 0.6, 50)]]))]))
    assert index.duplicate(paths, "image")  # our third image is BLINK's third: dropped
    assert not index.duplicate(paths[:2], "image")


def tiny_clip(path: str) -> str:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 16},
                     vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                                    "num_hidden_layers": 1, "num_attention_heads": 2}, projection_dim=8)
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_retrieval_then_ssim(tmp_path):
    from livr.data.build.dedup import Clip

    o = scene(31)
    src, look = png(o, str(tmp_path / "o.png")), png(scene(31, texture=5), str(tmp_path / "look.png"))
    d = os.path.dirname(write_blink(str(tmp_path / "blink/val.parquet"), [[jpeg(o)], [scene(32)]]))
    clip = Clip(tiny_clip(str(tmp_path / "clip")))
    v = clip.embed_file(src)
    assert v.shape == (8,) and abs(np.linalg.norm(v) - 1) < 1e-5
    no_hash = {"phash_max": -1, "blur_phash_max": -1}  # retrieval by CLIP alone
    with_clip = ExcludeIndex(iter_examples([d]), clip=clip, clip_min=-1.0, **no_hash)
    without = ExcludeIndex(iter_examples([d]), **no_hash)
    assert with_clip.duplicate([src]) and not without.duplicate([src])
    assert not with_clip.duplicate([look])  # retrieved by CLIP, not confirmed by SSIM
    high = ExcludeIndex(iter_examples([d]), clip=clip, clip_min=1.01, **no_hash)
    assert not high.duplicate([src])  # nothing retrieved above the threshold


def test_bad_inputs_one_line(tmp_path, capsys):
    src = str(tmp_path / "art")
    for pool in ("train", "test"):
        for style in ("a", "b"):
            for i in range(3):
                png(scene(40 + i), os.path.join(src, pool, style, f"{i}.jpg"))
    for args, want in ((["--exclude", str(tmp_path / "nope")], "nope: not a directory"),
                       (["--clip", str(tmp_path / "noclip")], "noclip: not a directory")):
        rc = main(["data", "build", "Art_Style", "--source", src, "--out", str(tmp_path / "o"), *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and want in err, err
    with pytest.raises(ValueError, match="dedup mode"):
        ExcludeIndex().duplicate(["x"], "bogus")


def test_build_drops_copies_with_clip(tmp_path):
    """Through the driver: `livr data build --exclude DIR --clip MODEL_DIR`; a BLINK copy of one ArtBench test
    image (resized JPEG, as BLINK's third image) is never used; the manifest counts the exclusions."""
    import json

    src, out = str(tmp_path / "art"), str(tmp_path / "out")
    for pool in ("train", "test"):
        for style in ("a", "b"):
            for i in range(6 if pool == "train" else 3):
                png(scene(60 + 20 * (pool == "test") + 10 * (style == "b") + i), os.path.join(src, pool, style, f"{i}.png"))
    copy = os.path.join(src, "test", "a", "0.png")
    write_blink(str(tmp_path / "blink/Art_Style/val.parquet"), [[scene(99), scene(98), jpeg(Image.open(copy))]])
    rc = main(["data", "build", "Art_Style", "--source", src, "--out", out, "--train", "4", "--val", "2", "--test",
               "4", "--exclude", str(tmp_path / "blink"), "--clip", tiny_clip(str(tmp_path / "clip"))])
    assert rc == 0
    with open(os.path.join(out, "Art_Style", "livr_build.json")) as f:
        m = json.load(f)
    assert m["request"]["clip"] and m["counts"]["test"]["excluded (near-duplicate of --exclude)"] >= 1
    with open(os.path.join(out, "Art_Style", "provenance", "test.jsonl")) as f:
        assert all(copy not in json.loads(line)["files"] for line in f)


def test_source_layout_errors_one_line(tmp_path, capsys, monkeypatch):
    """FunKPoint without labels.csv; MID scenes whose albedo is only EXR where no EXR reader works."""
    import builtins

    from livr.data.build import mid

    rc = main(["data", "build", "Functional_Correspondence", "--source", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "labels.csv: missing annotation file" in err
    src = tmp_path / "mid"
    for pool in ("train", "test"):
        d = src / pool / f"scene_{pool}"
        png(scene(80), str(d / "dir_0_mip2.jpg"))
        (d / "albedo.exr").write_bytes(b"not an exr")
    real = builtins.__import__

    def no_readers(name, *a, **k):
        if name in ("cv2", "imageio.v3", "imageio"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_readers)
    rc = main(["data", "build", "Relative_Reflectance", "--source", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "albedo.exr: cannot read EXR albedo" in err, err
    assert mid.EXR_NEEDS in err
