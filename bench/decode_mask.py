"""The Stage-1 mask of one bottleneck decode step (`livr eval --bottleneck`, `livr inspect`): only the new row,
against building the whole L x L mask and keeping its last row (what decoding did before).

    python bench/decode_mask.py [--batch 8] [--repeat 3]

Sequence lengths are those of 1 / 2 / 4 BLINK-like 1024x768 images for Qwen2.5-VL-3B (L = 1198 / 2199 / 4201),
groups laid out as livr encodes them (text, images, prompt, 16 latents, answer). Prints a table, then one line
`key=value ...` (`rows_ms_l4201`, `whole_ms_l4201`, `speedup_l4201`, ...). CPU or CUDA (whichever torch sees).
"""
from __future__ import annotations

import argparse
import time

import torch

from livr.backbones import FAMILIES
from livr.method.groups import ANSWER, IMAGE, LATENT, PROMPT, TEXT

LENGTHS = {1198: 999, 2199: 2 * 999, 4201: 4 * 999}  # L -> image tokens (999 per 1024x768 image)


def groups_for(batch: int, length: int, images: int, device) -> torch.Tensor:
    g = torch.full((batch, length), PROMPT, device=device)
    g[:, :20] = TEXT
    g[:, 20 : 20 + images] = IMAGE
    g[:, length - 22 : length - 6] = LATENT
    g[:, length - 6 :] = ANSWER
    return g


def timed(fn, repeat: int, device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fam = FAMILIES["qwen2_5_vl"]
    print(f"decode-step Stage-1 mask, batch {args.batch}, on {device.type}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}")
    print("| L | whole mask, last row kept (ms) | new row only (ms) | speedup |")
    print("|---|---|---|---|")
    out = {}
    for length, images in LENGTHS.items():
        g = groups_for(args.batch, length, images, device)
        whole = timed(lambda g=g: fam.as_mask(None, fam.own_allowed(None, g) & ~_blocked(g), torch.float32, 1),
                      args.repeat, device)
        rows = timed(lambda g=g: fam.stage1_mask(None, g, torch.float32, rows=1), args.repeat, device)
        assert torch.equal(fam.stage1_mask(None, g, torch.float32, rows=1),
                           fam.as_mask(None, fam.own_allowed(None, g) & ~_blocked(g), torch.float32, 1))
        print(f"| {length} | {whole:.1f} | {rows:.1f} | {whole / rows:.0f}x |")
        out.update({f"whole_ms_l{length}": f"{whole:.1f}", f"rows_ms_l{length}": f"{rows:.1f}",
                    f"speedup_l{length}": f"{whole / rows:.1f}"})
    print(" ".join(f"{k}={v}" for k, v in {"device": device.type, **out}.items()))


def _blocked(g):
    from livr.method.mask import bottleneck_blocked

    return bottleneck_blocked(g)


if __name__ == "__main__":
    main()
