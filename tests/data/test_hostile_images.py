"""Hostile images (issue 30 #3): a PNG whose header claims 50,000 x 50,000 pixels (and one at 10,000 x 10,000, which
PIL alone only warns about and decodes) is refused from its header, before decoding: in BLINK row validation, in the
training/evaluation loader and in `livr data build` (open_image), with one line naming task, split and idx (a build
skips the source file, naming it). A 1x1 image is encoded at the processor's minimum; an extreme aspect ratio is
refused with the same kind of line."""
import io
import struct
import zlib

import pytest
from PIL import Image

from livr.data.blink import validate_row
from livr.data.build.common import Skip, image_size, open_image
from livr.data.loader import EncodedRows, Rows, checked, collate_rows
from livr.data.tasks import DataError


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels and holds none (a few dozen bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buf, format="PNG")
    return buf.getvalue()


BOMBS = [(50_000, 50_000), (10_000, 10_000)]  # past twice PIL's limit (its error), between 1x and 2x (its warning)


def _row(idx: str, image: bytes) -> dict:
    return {"idx": idx, "question": "How many shapes?", "choices": ["1", "2"], "answer": "(A)", "sub_task": "Counting",
            "prompt": "", "image_1": {"bytes": image, "path": None}}


@pytest.mark.parametrize("size", BOMBS)
def test_validation_refuses_a_bomb_from_its_header(size):
    with pytest.raises(DataError) as e:
        validate_row(_row("Counting_val_7", png_header(*size)), "Counting", "val")
    msg = str(e.value)
    assert msg.startswith("Counting/val idx=Counting_val_7: image_1 is refused before decoding: more pixels than "
                          "PIL.Image.MAX_IMAGE_PIXELS") and "\n" not in msg, msg
    validate_row(_row("Counting_val_8", png(1, 1)), "Counting", "val")  # tiny is fine here


def test_loader_refuses_bombs_encodes_tiny_and_refuses_extreme_aspect(backbone_cache, data_cache, tmp_path):
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    from livr.config import load_config
    from livr.model.build import build_model

    lm = build_model(load_config(None, [f"model.cache_dir={backbone_cache}", "latents.num_latents=2", "lora.r=2"]))
    images = {"bomb": png_header(50_000, 50_000), "warned": png_header(10_000, 10_000), "tiny": png(1, 1),
              "thin": png(1, 500)}
    rows = [_row(f"Counting_train_{k}", {"bytes": v, "path": None}) for k, v in images.items()]
    features = Features({"idx": Value("string"), "question": Value("string"), "choices": Sequence(Value("string")),
                         "answer": Value("string"), "sub_task": Value("string"), "prompt": Value("string"),
                         "image_1": ImageFeature()})
    ds = Dataset.from_list([{**r, "image_1": r["image_1"]["bytes"]} for r in rows], features=features)
    data = EncodedRows(Rows([ds]), lm.builder, split="train")
    got = {k: data[i] for i, k in enumerate(images)}
    for k in ("bomb", "warned"):
        err = got[k]["_error"]
        assert err.startswith(f"Counting/train idx=Counting_train_{k}: its image(s) is refused before decoding") \
            and "\n" not in err, err
    assert got["tiny"]["image_grid_thw"].tolist() == [[1, 4, 4]]  # the processor's minimum (min_pixels)
    assert "_error" not in got["tiny"]
    assert got["thin"]["_error"].startswith("Counting/train idx=Counting_train_thin: the image processor cannot read "
                                            "this row's image(s): ValueError: absolute aspect ratio"), got["thin"]
    with pytest.raises(DataError, match="Counting/train idx=Counting_train_bomb"):  # in the main process: one line
        checked(collate_rows([got["tiny"], got["bomb"]], lm.tokenizer.pad_token_id))


def test_data_build_open_image_refuses_from_the_header(tmp_path):
    for size in BOMBS:
        path = tmp_path / f"bomb-{size[0]}.png"
        path.write_bytes(png_header(*size))
        for fn in (open_image, image_size):
            with pytest.raises(Skip) as e:
                fn(str(path))
            assert e.value.kind == "oversized image" and str(path) in str(e.value)
            assert "is refused before decoding" in str(e.value) and "\n" not in str(e.value)
    thin = tmp_path / "thin.png"
    thin.write_bytes(png(1, 500))
    with pytest.raises(Skip) as e:
        open_image(str(thin))
    assert e.value.kind == "extreme aspect ratio" and "is 1x500" in str(e.value)
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(png(1, 1))
    assert open_image(str(tiny)).size == (1, 1) and image_size(str(tiny)) == (1, 1)
