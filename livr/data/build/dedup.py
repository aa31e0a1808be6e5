"""De-duplication of built rows against held-out images (`livr data build --exclude DIR`), as the paper does it
(arXiv 2512.21218, Appendix A): candidates are retrieved, then confirmed by structural similarity.

Retrieval (any of): the 64-bit DCT perceptual hash (imagehash.phash) within PHASH_MAX_DISTANCE bits; for tasks
whose held-out images carry drawn markers (BLINK's boxes and points: mode "annotated"), the pHash of a blurred
grayscale copy within BLUR_PHASH_MAX_DISTANCE bits, so a drawn box or circle does not hide the copy; and, with
`--clip MODEL_DIR`, CLIP image-embedding cosine >= CLIP_MIN_COSINE. Confirmation: SSIM
(skimage.metrics.structural_similarity) of the 64 x 64 grayscale thumbnails >= SSIM_MIN; in "annotated" mode
the SSIM map's mean over its best 80% (drawn markers cover a minority of the pixels; an unrelated scene is low
everywhere). A retrieved image that SSIM does not confirm is kept.

Which images must match, per task (the builder's spec["dedup"]):
  "image"      any image of the row matches any held-out image (the default; Art_Style and Visual_Similarity
               compare all three images of the row with all images of every held-out example)
  "annotated"  as "image", with the blurred-grayscale pass as well
  "pair"       correspondence pairs: the row's two images must match the two images of ONE held-out example,
               aligned (1~1, 2~2) or swapped (1~2, 2~1); a held-out example with a single image (a loose image
               file) is matched image by image. Blurred pass included (BLINK's pairs carry drawn points).

Held-out images: image files (each its own example) and the image cells of parquet files (one example per row:
a local copy of BLINK, `<task>/val-*.parquet`)."""

from __future__ import annotations

import functools
import io
import os

import numpy as np
from PIL import Image, ImageFilter

from livr.data.build.common import IMAGE_EXTS, PHASH_MAX_DISTANCE, Skip, SourceError, open_image, phash

THUMB = 64
BLUR_SIDE, MEDIAN, BLUR_RADIUS = 128, 9, 2
BLUR_PHASH_MAX_DISTANCE = 10
SSIM_MIN = 0.80
ROBUST_DROP = 0.2  # annotated mode: SSIM averaged over the best 80% of the map
CLIP_MIN_COSINE = 0.90
MODES = ("image", "annotated", "pair")


# --------------------------------------------------------------------------------------------- features
def thumb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8)


def blurred(img: Image.Image) -> Image.Image:
    """The blurred grayscale copy (128 x 128): a median filter removes drawn lines, circles and label tags up to
    ~3 px wide at this scale (BLINK's markers), a Gaussian blur the rest of their edges."""
    g = img.convert("L").resize((BLUR_SIDE, BLUR_SIDE), Image.BILINEAR)
    return g.filter(ImageFilter.MedianFilter(MEDIAN)).filter(ImageFilter.GaussianBlur(BLUR_RADIUS))


def features(img: Image.Image) -> dict:
    """What matching needs of one image: its pHash, the pHash of its blurred grayscale copy, its thumbnail."""
    return {"phash": phash(img), "bphash": phash(blurred(img)), "thumb": thumb(img)}


@functools.lru_cache(maxsize=4096)
def file_features(path: str) -> dict:
    return features(open_image(path))


def ssim(a: np.ndarray, b: np.ndarray, robust: bool = False) -> float:
    """Mean SSIM of two thumbnails; `robust`: the mean over the best (1 - ROBUST_DROP) of the SSIM map, so drawn
    markers (a minority of the pixels) do not hide a copy, while an unrelated scene stays low everywhere."""
    from skimage.metrics import structural_similarity

    if not robust:
        return float(structural_similarity(a, b, data_range=255))
    _, m = structural_similarity(a, b, data_range=255, full=True)
    v = np.sort(m.ravel())
    return float(v[int(len(v) * ROBUST_DROP):].mean())


def _bits(table: np.ndarray, h: int) -> np.ndarray:
    x = np.bitwise_xor(table, np.uint64(h))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


# --------------------------------------------------------------------------------------------- the index
def iter_examples(dirs):
    """(example id, [PIL image, ...]) for every held-out example under the directories; streams parquet files
    row group by row group."""
    import pyarrow.parquet as pq

    for d in dirs:
        if not os.path.isdir(d):
            raise SourceError(f"--exclude {d}: not a directory")
        for root, subdirs, files in os.walk(d):
            subdirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                low = name.lower()
                if low.endswith(IMAGE_EXTS):
                    try:
                        yield path, [open_image(path)]
                    except Skip:
                        continue
                elif low.endswith(".parquet"):
                    try:
                        pf = pq.ParquetFile(path)
                    except Exception as e:  # noqa: BLE001
                        raise SourceError(f"--exclude {path}: not a parquet file ({type(e).__name__})") from None
                    row = 0
                    for g in range(pf.num_row_groups):
                        for rec in pf.read_row_group(g).to_pylist():
                            imgs = []
                            for col in sorted(rec):
                                cell = rec[col]
                                data = cell.get("bytes") if isinstance(cell, dict) else None
                                if isinstance(data, (bytes, bytearray)):
                                    try:
                                        with Image.open(io.BytesIO(data)) as im:
                                            imgs.append(im.convert("RGB"))
                                    except Exception:  # noqa: BLE001, S112 - not an image cell
                                        continue
                            if imgs:
                                yield f"{path}:{row}", imgs
                            row += 1


class ExcludeIndex:
    """Every held-out image's features, and which example (and position in it) each belongs to."""

    def __init__(self, examples=(), clip=None, phash_max=PHASH_MAX_DISTANCE, blur_phash_max=BLUR_PHASH_MAX_DISTANCE,
                 ssim_min=SSIM_MIN, clip_min=CLIP_MIN_COSINE):
        self.clip, self.phash_max, self.blur_phash_max = clip, phash_max, blur_phash_max
        self.ssim_min, self.clip_min = ssim_min, clip_min
        feats, self.example, self.pos, self.size = [], [], [], {}
        embeds = []
        for eid, imgs in examples:
            self.size[eid] = len(imgs)
            for k, img in enumerate(imgs):
                feats.append(features(img))
                self.example.append(eid)
                self.pos.append(k)
                if clip is not None:
                    embeds.append(clip.embed(img))
        self.phash = np.array([f["phash"] for f in feats], dtype=np.uint64)
        self.bphash = np.array([f["bphash"] for f in feats], dtype=np.uint64)
        self.thumb = [f["thumb"] for f in feats]
        self.embed = np.stack(embeds) if embeds else None

    def __len__(self) -> int:
        return len(self.example)

    def hits(self, path: str, annotated: bool) -> set[int]:
        """Indices of the held-out images that one source image duplicates (retrieved, then SSIM-confirmed)."""
        if not len(self):
            return set()
        f = file_features(path)
        cand = set(np.nonzero(_bits(self.phash, f["phash"]) <= self.phash_max)[0].tolist())
        if annotated:
            cand |= set(np.nonzero(_bits(self.bphash, f["bphash"]) <= self.blur_phash_max)[0].tolist())
        if self.clip is not None and self.embed is not None:
            cos = self.embed @ self.clip.embed_file(path)
            cand |= set(np.nonzero(cos >= self.clip_min)[0].tolist())
        return {j for j in sorted(cand) if ssim(f["thumb"], self.thumb[j], robust=annotated) >= self.ssim_min}

    def duplicate(self, paths, mode: str = "image") -> bool:
        """True if the row made of these source images duplicates a held-out example (see the module doc)."""
        if mode not in MODES:
            raise ValueError(f"dedup mode must be one of {MODES}, got {mode!r}")
        if not len(self) or not paths:
            return False
        annotated = mode in ("annotated", "pair")
        hits = [self.hits(p, annotated) for p in paths]
        if mode != "pair" or len(paths) != 2:
            return any(hits)
        a, b = hits
        if any(self.size[self.example[i]] == 1 for i in a | b):  # a loose image file: matched image by image
            return True
        for i in a:
            for j in b:
                if self.example[i] != self.example[j]:
                    continue
                aligned = self.pos[i] == 0 and self.pos[j] == 1
                swapped = self.pos[i] == 1 and self.pos[j] == 0
                if aligned or swapped:
                    return True
        return False


# --------------------------------------------------------------------------------------------- CLIP
class Clip:
    """A CLIP image encoder from a local directory (transformers CLIPModel + its image processor)."""

    def __init__(self, path: str):
        import torch
        from transformers import CLIPImageProcessor, CLIPModel

        if not os.path.isdir(path):
            raise SourceError(f"--clip {path}: not a directory (a CLIP checkpoint saved with save_pretrained)")
        try:
            self.model = CLIPModel.from_pretrained(path).eval()
            self.processor = CLIPImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise SourceError(f"--clip {path}: not a CLIP checkpoint ({str(e).splitlines()[0]})") from None
        self.torch = torch

    def embed(self, img: Image.Image) -> np.ndarray:
        with self.torch.no_grad():
            px = self.processor(images=img, return_tensors="pt")["pixel_values"]
            out = self.model.get_image_features(pixel_values=px)
            v = out if isinstance(out, self.torch.Tensor) else out.pooler_output
            v = v[0].float().numpy()
        return v / max(float(np.linalg.norm(v)), 1e-12)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one encoder per build
    def embed_file(self, path: str) -> np.ndarray:
        return self.embed(open_image(path))


def load_index(dirs, clip: str | None = None, progress: bool = False) -> ExcludeIndex:
    """The index of every image under the --exclude directories (and CLIP embeddings with --clip)."""
    it = iter_examples(dirs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="indexing --exclude images", unit="example", leave=False, disable=None)  # terminal only
    return ExcludeIndex(it, clip=Clip(clip) if clip else None)
