"""Counting from PixMo-Count (allenai/pixmo-count): open-ended counts 2-10, counts balanced.

Layout: SRC/data/{train,validation,test}-*.parquet as on the hub (columns image_url, image_sha256, count,
label; also accepted directly under SRC), images downloaded by the user to SRC/images/<image_sha256>[.ext].
A row whose image is missing (its URL no longer resolves) or whose bytes do not match image_sha256 is
skipped and counted, as the paper discards dead URLs (Appendix A.1)."""

from __future__ import annotations

import glob
import hashlib
import io
import os

from PIL import Image

from livr.data.build.common import Skip, SourceError, phash

POOLS = {"train": "train", "validation": "validation", "test": "test"}
COLUMNS = ("image_url", "image_sha256", "count", "label")
MIN_COUNT, MAX_COUNT = 2, 10


def _parquet_files(source: str, pool: str) -> list[str]:
    for base in (os.path.join(source, "data"), source):
        files = sorted(glob.glob(os.path.join(glob.escape(base), f"{pool}-*.parquet")))
        files += sorted(glob.glob(os.path.join(glob.escape(base), f"{pool}.parquet")))
        if files:
            return files
    return []


def _image_index(source: str) -> dict[str, str]:
    d = os.path.join(source, "images")
    if not os.path.isdir(d):
        raise SourceError(f"Counting: {d}: missing (download each row's image_url to images/<image_sha256>.<ext>)")
    return {e.name.split(".")[0].lower(): e.path for e in os.scandir(d) if e.is_file()}


def scan(source: str) -> dict:
    import pyarrow.parquet as pq

    images = _image_index(source)
    pools = {}
    for pool in POOLS:
        files = _parquet_files(source, pool)
        if not files:
            raise SourceError(f"Counting: {os.path.join(source, 'data', pool + '-*.parquet')}: missing "
                              f"(PixMo-Count's {pool} split)")
        units = []
        for f in files:
            pf = pq.ParquetFile(f)
            missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise SourceError(f"Counting: {f}: missing column(s) {', '.join(missing)}")
            for batch in pf.iter_batches(columns=list(COLUMNS), batch_size=4096):
                for j, r in enumerate(batch.to_pylist()):
                    count, sha = r["count"], str(r["image_sha256"] or "").lower()
                    if count is None or not MIN_COUNT <= int(count) <= MAX_COUNT or not sha:
                        continue
                    units.append({"key": f"{pool}:{len(units)}", "group": sha, "images": [sha], "sha": sha,
                                  "path": images.get(sha), "count": int(count), "label": str(r["label"])})
        pools[pool] = units
    return pools


def prepare(unit: dict, rng, ctx) -> dict:
    if not unit["path"]:
        raise Skip("missing image", f"images/{unit['sha']}.* (dead URL?)")
    with open(unit["path"], "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != unit["sha"]:
        raise Skip("image sha256 mismatch", unit["path"])
    try:
        with Image.open(io.BytesIO(data)) as im:
            img = im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise Skip("unreadable image", f"{unit['path']} ({type(e).__name__})") from None
    return {"path": unit["path"], "count": unit["count"], "label": unit["label"], "images": unit["images"],
            "hashes": [phash(img)], "sources": [unit["path"]], "labels": [unit["count"] - MIN_COUNT],
            "prov": {"files": [unit["path"]], "count": unit["count"]}}


def render(sample: dict, label: int) -> dict:
    with Image.open(sample["path"]) as im:
        img = im.convert("RGB")
    q = f"How many {sample['label']} are there in the image?"
    return {"images": [img], "question": q, "text": q, "choices": [], "answer": str(sample["count"])}


COUNTING = {"scan": scan, "prepare": prepare, "render": render, "labels": MAX_COUNT - MIN_COUNT + 1,
            "splits": {"train": "train", "val": "validation", "test": "test"}}
