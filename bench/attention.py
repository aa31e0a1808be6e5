"""Stage-1 attention cost against a causal forward, at real width and real sequence lengths.

    python bench/attention.py [--repeat 2] [--lengths 1198,2199,4201] [--compile-flex]

The language model of `size-qwen2.5-vl-3b` at depth 2 (hidden 2048, 16 heads, 2 KV heads; random weights, built
offline) runs on L tokens laid out as livr encodes 1 / 2 / 4 BLINK-like 1024x768 images (999 image tokens each,
text, 16 latents, answer): L = 1198 / 2199 / 4201. Per L it times (forward on CPU, forward + backward on CUDA):
  causal    — SDPA with the plain 2-D mask (what SFT / Stage 2 run),
  sdpa_mask — SDPA with livr's additive 4-D Stage-1 mask,
  eager     — eager attention with that mask,
  flex      — livr's flex_attention BlockMask (compiled on CUDA; on CPU eager and unfused, as livr runs it there
              by default, or compiled with --compile-flex).
Prints a table (ms and the ratio to causal), then one line `key=value ...` (`sdpa_mask_ratio_l4201`,
`flex_fwd_ratio_l4201`, `eager_ratio_l4201`, ..., `device`). The frozen-vision cache (`vision_cache_speedup`) is
not implemented yet and is not measured here.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from decode_mask import timed  # bench/ is on sys.path when run as a script

from livr import flex
from livr.sequence import ANSWER, IMAGE, LATENT, PROMPT, TEXT

IMAGE_TOKENS = 999  # one 1024x768 image, Qwen2.5-VL (patch 14, merge 2)


def layout(length: int, images: int, device) -> torch.Tensor:
    g = torch.full((1, length), PROMPT, device=device)
    g[:, :20] = TEXT
    g[:, 20 : 20 + images * IMAGE_TOKENS] = IMAGE
    g[:, length - 22 : length - 6] = LATENT
    g[:, length - 6 :] = ANSWER
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--lengths", default="1198,2199,4201")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "livr_bench_presets"))
    ap.add_argument("--compile-flex", action="store_true", help="compile flex_attention on CPU too "
                    "(LIVR_FLEX_COMPILE=1; on CUDA it always is)")
    args = ap.parse_args()
    if args.compile_flex:
        os.environ["LIVR_FLEX_COMPILE"] = "1"
    from livr.backbones import FAMILIES, load_backbone, resolve_backbone_path

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    train = device.type == "cuda"
    path = resolve_backbone_path("size-qwen2.5-vl-3b", args.cache_dir, num_layers=2)
    bb = load_backbone(path, dtype=dtype, device=str(device), attn_implementation="sdpa")
    fam, model = FAMILIES["qwen2_5_vl"], bb.model
    lm = model.model.language_model
    model.requires_grad_(False)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    compiled = device.type == "cuda" or args.compile_flex
    print(f"Stage-1 attention vs causal: size-qwen2.5-vl-3b language model, depth 2, {dtype}, on {name}, "
          f"{'forward + backward' if train else 'forward'}; flex {'compiled' if compiled else 'eager (unfused)'}")
    print("| L | causal ms | sdpa + 4-D mask | eager + mask | flex | ratios (sdpa / eager / flex) |")
    print("|---|---|---|---|---|---|")
    out = {"device": device.type, "flex_compiled": int(compiled)}
    for length in [int(x) for x in args.lengths.split(",")]:
        images = max(1, (length - 200) // IMAGE_TOKENS)
        groups = layout(length, images, device)
        h = torch.randn(1, length, model.config.get_text_config().hidden_size, device=device, dtype=dtype) * 0.02
        h.requires_grad_(train)
        pos = torch.arange(length, device=device)[None].expand(3, 1, -1)  # mRoPE: text-style positions

        def run(impl, mask, h=h, pos=pos):
            model.set_attn_implementation(flex.impl_name(impl))
            with torch.set_grad_enabled(train):
                y = lm(inputs_embeds=h, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
                if train:
                    y.float().square().mean().backward()

        causal2d = torch.ones(1, length, dtype=torch.long, device=device)
        stage1 = fam.stage1_mask(model, groups, dtype)
        block = flex.block_mask(fam, groups)
        masks = {"causal": ("sdpa", causal2d), "sdpa_mask": ("sdpa", stage1), "eager": ("eager", stage1),
                 "flex": ("flex_attention", block)}
        ms = {k: timed(lambda im=im, m=m, run=run: run(im, m), args.repeat, device) for k, (im, m) in masks.items()}
        r = {k: v / ms["causal"] for k, v in ms.items()}
        print(f"| {length} | {ms['causal']:.0f} | {ms['sdpa_mask']:.0f} | {ms['eager']:.0f} | {ms['flex']:.0f} | "
              f"{r['sdpa_mask']:.2f} / {r['eager']:.2f} / {r['flex']:.2f} |")
        tag = "" if train else "_fwd"
        out.update({f"causal_ms_l{length}": f"{ms['causal']:.0f}", f"sdpa_mask_ratio_l{length}": f"{r['sdpa_mask']:.3f}",
                    f"eager_ratio_l{length}": f"{r['eager']:.3f}", f"flex{tag}_ratio_l{length}": f"{r['flex']:.3f}"})
    print(" ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
