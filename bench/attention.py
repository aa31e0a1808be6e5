"""Stage-1 attention cost against a causal forward, at real width and real sequence lengths.

    python bench/attention.py [--repeat 3] [--lengths 1198,2199,4201] [--compile-flex]

The language model of `size-qwen2.5-vl-3b` at depth 2 (hidden 2048, 16 heads, 2 KV heads; random weights, built
offline) runs on L tokens laid out as livr encodes 1 / 2 / 4 BLINK-like 1024x768 images (999 image tokens each,
text, 16 latents, answer): L = 1198 / 2199 / 4201. Per L it times (forward on CPU, forward + backward on CUDA):
  causal    — SDPA with the plain 2-D mask (what SFT / Stage 2 run),
  sdpa_mask — SDPA with livr's additive 4-D Stage-1 mask,
  eager     — eager attention with that mask,
  flex      — livr's flex_attention BlockMask (compiled on CUDA; on CPU eager and unfused, as livr runs it there
              by default, or compiled with --compile-flex).
Then the frozen-vision cache (model.cache_vision): one Stage-1 training step (forward + backward, LoRA + latents)
of livr's own model (build_model) on one real 1024x768 image through the real processor, with the vision tower at
its full depth (32 blocks, random weights) and the language model at depth 2, without and with the cache
(`vision_cache_speedup`), and projected to the full 36 decoder layers from the measured time of the 2 layers
(`vision_cache_speedup_full_depth`).
Prints tables (ms and the ratio to causal), then one line `key=value ...` (`sdpa_mask_ratio_l4201`,
`flex_fwd_ratio_l4201`, `eager_ratio_l4201`, ..., `vision_cache_speedup`, `device`).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from livr.method.groups import ANSWER, IMAGE, LATENT, PROMPT, TEXT
from livr.model import flex

IMAGE_TOKENS = 999  # one 1024x768 image, Qwen2.5-VL (patch 14, merge 2)


def layout(length: int, images: int, device) -> torch.Tensor:
    g = torch.full((1, length), PROMPT, device=device)
    g[:, :20] = TEXT
    g[:, 20 : 20 + images * IMAGE_TOKENS] = IMAGE
    g[:, length - 22 : length - 6] = LATENT
    g[:, length - 6 :] = ANSWER
    return g


def interleaved(fns: dict, repeat: int, device) -> dict[str, float]:
    """Median ms per function over `repeat` rounds that run every function once, in turn (after one warm-up
    round): a shared machine's slow minutes hit all of them alike, not the one that happened to run then."""
    import statistics
    import time

    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            f()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(1000 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (median)")
    ap.add_argument("--lengths", default="1198,2199,4201")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "livr_bench_presets"))
    ap.add_argument("--compile-flex", action="store_true", help="compile flex_attention on CPU too "
                    "(LIVR_FLEX_COMPILE=1; on CUDA it always is)")
    ap.add_argument("--skip-vision-cache", action="store_true", help="only the attention table")
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
        ms = interleaved({k: (lambda im=im, m=m, run=run: run(im, m)) for k, (im, m) in masks.items()}, args.repeat, device)
        r = {k: v / ms["causal"] for k, v in ms.items()}
        print(f"| {length} | {ms['causal']:.0f} | {ms['sdpa_mask']:.0f} | {ms['eager']:.0f} | {ms['flex']:.0f} | "
              f"{r['sdpa_mask']:.2f} / {r['eager']:.2f} / {r['flex']:.2f} |")
        tag = "" if train else "_fwd"
        out.update({f"causal_ms_l{length}": f"{ms['causal']:.0f}", f"sdpa_mask_ratio_l{length}": f"{r['sdpa_mask']:.3f}",
                    f"eager_ratio_l{length}": f"{r['eager']:.3f}", f"flex{tag}_ratio_l{length}": f"{r['flex']:.3f}"})
    if not args.skip_vision_cache:
        del model, bb, lm
        out.update(vision_cache(args, device, dtype, name))
    print(" ".join(f"{k}={v}" for k, v in out.items()))


def vision_preset(cache_dir: str) -> str:
    """size-qwen2.5-vl-3b with its full vision tower and 2 decoder layers, saved once (bf16, like the presets)."""
    from livr.backbones import FAMILIES
    from livr.backbones.base import random_model, truncate_text
    from livr.utils.atomic import replace_dir

    out = os.path.join(cache_dir, "size-qwen2.5-vl-3b-text2-vision32")
    if not os.path.exists(os.path.join(out, "config.json")):
        fam = FAMILIES["qwen2_5_vl"]
        cfg, tok, ip = fam.size_parts()
        truncate_text(cfg.get_text_config(), 2)
        model = random_model(fam, cfg, tok, dtype=torch.bfloat16)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_dir)
        for part in (model, tok, ip):
            part.save_pretrained(tmp)
        replace_dir(tmp, out)
    return out


def vision_cache(args, device, dtype, name) -> dict:
    from PIL import Image

    from livr.config import load_config
    from livr.data.sequence import collate
    from livr.data.synthetic import generate_task
    from livr.model.build import build_model

    path = vision_preset(args.cache_dir)
    cfg = load_config(None, [f"model.backbone={path}", f"model.dtype={str(dtype).split('.')[-1]}",
                             f"model.device={device.type}", "latents.num_latents=16", "model.cache_vision=true"])
    lm = build_model(cfg)
    lm.model.train()
    row = generate_task("Counting", 1, seed=0)[0]
    row["image_1"] = row["image_1"].resize((1024, 768), Image.BICUBIC)
    batch = collate([lm.builder.encode(row)], lm.tokenizer.pad_token_id)
    length = batch["input_ids"].shape[1]

    def step():
        loss, n = lm.answer_nll(batch, bottleneck=True)
        (loss / n).backward()
        lm.model.zero_grad(set_to_none=True)

    cache = lm.vision_cache
    inputs = lm.model_inputs(batch, bottleneck=True)  # (encodes the image once: the cache is filled here)
    text = lm.model.get_base_model().model.language_model
    h = torch.randn(*batch["input_ids"].shape, text.config.hidden_size, device=device, dtype=dtype) * 0.02

    def layers_step():  # the 2 decoder layers alone (LoRA in them), forward + backward
        y = text(inputs_embeds=h, attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"],
                 use_cache=False).last_hidden_state
        y.float().square().mean().backward()
        lm.model.zero_grad(set_to_none=True)

    def with_cache(on: bool):
        lm.vision_cache = cache if on else None
        step()

    repeat = max(1, args.repeat - 1) if device.type == "cpu" else args.repeat  # (a CPU step with vision: ~50 s)
    ms = interleaved({"plain": lambda: with_cache(False), "cached": lambda: with_cache(True), "layers": layers_step},
                     repeat, device)
    assert cache.misses == 1 and cache.hits >= repeat + 1
    plain, cached, layers = ms["plain"], ms["cached"], ms["layers"]
    full = cached + (36 - 2) * layers / 2
    speedup, speedup_full = plain / cached, (full + plain - cached) / full
    print(f"\nFrozen-vision cache: one Stage-1 training step (fwd + bwd), livr model of size-qwen2.5-vl-3b (vision "
          f"32 blocks, language model depth 2), one 1024x768 image (L {length}), {dtype}, on {name}")
    print("| vision encoder each step ms | cached ms | 2 decoder layers ms | speedup | projected to 36 layers |")
    print("|---|---|---|---|---|")
    print(f"| {plain:.0f} | {cached:.0f} | {layers:.0f} | {speedup:.2f} | {speedup_full:.2f} |")
    return {"vision_step_ms": f"{plain:.0f}", "vision_cached_step_ms": f"{cached:.0f}",
            "vision_cache_speedup": f"{speedup:.3f}", "vision_cache_speedup_full_depth": f"{speedup_full:.3f}"}


if __name__ == "__main__":
    main()
