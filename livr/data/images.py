"""Hostile images, refused from the header before any pixel is decoded.

PIL reads an image's size from its header at `Image.open`; decoding (`load`) is what allocates width x height x
channels bytes. An image above `PIL.Image.MAX_IMAGE_PIXELS` (89.5 MP by default; set it to change the limit) is a
decompression bomb or an absurd size: PIL only warns up to twice that limit and decodes it; livr refuses it at
`Image.open` (`refuse_bombs`), in the loaders and in `livr data build`. Tiny images (1x1) are encoded at the
processor's minimum size; an aspect ratio above MAX_ASPECT (the Qwen-VL processors' own limit) is refused."""
from __future__ import annotations

import contextlib
import warnings

from PIL import Image

MAX_ASPECT = 200


@contextlib.contextmanager
def refuse_bombs():
    """PIL's DecompressionBombWarning raised as an error: an image above Image.MAX_IMAGE_PIXELS fails at open."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def is_bomb(e: BaseException) -> bool:
    return isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning))


def image_problem(e: BaseException) -> str:
    """The phrase for an image that failed to open or decode: refused (a bomb) or undecodable."""
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    if is_bomb(e):
        return f"is refused before decoding: more pixels than PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} ({text})"
    return f"cannot be decoded ({text})"


def aspect_problem(size: tuple[int, int]) -> str | None:
    w, h = size
    if min(w, h) < 1:
        return f"is {w}x{h}: empty"
    if max(w, h) / min(w, h) > MAX_ASPECT:
        return f"is {w}x{h}: an aspect ratio above {MAX_ASPECT}, which no supported image processor encodes"
    return None
