"""The cost of the Stage-1 bottleneck on a hybrid (Gated DeltaNet + full attention) backbone, on CPU.

A Stage-1 step runs each Gated DeltaNet layer's recurrence twice (the stock one and the image-blind one, as one
batch of 2B: livr/backbones/gated_deltanet.py) and the full-attention layers under an additive 4-D mask; a Stage-2
step is the stock model under the 2-D mask. Measured: one training step (forward + backward of the answer loss,
LoRA + latent rows trainable) of a padded batch, median of `--repeat` after a warm-up, for each preset given, then
the same for a real-size preset cut to `--size-layers` decoder layers (true widths, random weights: by default
Qwen3.5-4B at depth 4, three Gated DeltaNet layers and one full-attention layer) on one example with one image of
`--size-image` px (768 px: 576 image tokens, L ~ 650).

    python bench/hybrid_cost.py [--presets tiny-qwen3.5 tiny-qwen3.5-moe] [--batch 4] [--repeat 5]
                                [--size size-qwen3.5-4b] [--size-layers 4] [--size-image 768] [--size-repeat 3]
                                [--cache-dir DIR]      # keep the materialised size preset between runs

`--size none` skips the real-size row. Prints a table and, last, one `key=value` line
(stage1_over_stage2_<preset>=<ratio> ...; target <= 1.5).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch

from livr.config import load_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.model.build import build_model

TARGET = 1.5


def step_ms(lm, batch, repeat: int) -> tuple[float, float]:
    """Median ms of a Stage-1 and of a Stage-2 step, alternated (a shared machine's load hits both alike)."""
    times = {True: [], False: []}
    for i in range(repeat + 1):
        for bottleneck in (True, False):
            t = time.perf_counter()
            nll, count = lm.answer_nll(batch, bottleneck)
            (nll / count).backward()
            lm.model.zero_grad(set_to_none=True)
            if i:  # the first round is a warm-up
                times[bottleneck].append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[True]), statistics.median(times[False])


def measure(preset: str, rows: list[dict], repeat: int, cache: str, tmp: str, num_layers: int = 0) -> tuple:
    """(batch x L, linear layers, full layers, image tokens, Stage-1 ms, Stage-2 ms) of `preset` on `rows`."""
    cfg = load_config(None, [f"model.backbone={preset}", f"model.cache_dir={cache}", f"data.cache_dir={tmp}/d",
                             f"output_dir={tmp}/runs", "latents.num_latents=4", "tracking.enabled=false",
                             f"model.num_layers={num_layers}"])
    lm = build_model(cfg)
    lm.model.train()
    types = list(lm.model.get_base_model().config.get_text_config().layer_types)
    if not {"linear_attention", "full_attention"} <= set(types):
        raise SystemExit(f"{preset} at depth {num_layers}: layer types {types} lack one of the two kinds")
    batch = collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id)
    s1, s2 = step_ms(lm, batch, repeat)
    out = (tuple(batch["input_ids"].shape), types.count("linear_attention"), types.count("full_attention"),
           int((batch["groups"] == 1).sum()), s1, s2)
    del lm, batch
    gc.collect()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="*", default=["tiny-qwen3.5"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--num-layers", type=int, default=0, help="model.num_layers of --presets")
    ap.add_argument("--size", default="size-qwen3.5-4b", help="a real-size hybrid preset, or 'none'")
    ap.add_argument("--size-layers", type=int, default=4, help="its model.num_layers (both layer types kept)")
    ap.add_argument("--size-image", type=int, default=768, help="its one image's side in px")
    ap.add_argument("--size-repeat", type=int, default=3)
    ap.add_argument("--cache-dir", default=None, help="where presets are materialised (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    table, kv = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or f"{tmp}/bb"
        for preset in args.presets:
            rows = (generate_task("Visual_Similarity", args.batch // 2, seed=1)
                    + generate_task("Counting", args.batch - args.batch // 2, seed=1))
            m = measure(preset, rows, args.repeat, cache, tmp, args.num_layers)
            name = preset if not args.num_layers else f"{preset}-L{args.num_layers}"
            table.append((name, args.repeat, *m))
        if args.size != "none":
            rows = generate_task("Counting", 1, seed=1, image_size=args.size_image)
            m = measure(args.size, rows, args.size_repeat, cache, tmp, args.size_layers)
            table.append((f"{args.size}-L{args.size_layers}", args.size_repeat, *m))
    for name, _, _, _, _, _, s1, s2 in table:
        kv[f"stage1_over_stage2_{name}"] = f"{s1 / s2:.3f}"
    kv["target"] = TARGET
    kv["met"] = all(s1 / s2 <= TARGET for *_, s1, s2 in table)
    print(f"Stage-1 vs Stage-2 training step (fwd + bwd, LoRA + latents), CPU fp32, {torch.get_num_threads()} threads, "
          f"median of n after a warm-up, alternated")
    print("| preset | batch x L | image tokens | linear layers | full layers | n | Stage 1 ms | Stage 2 ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, shape, nl, nf, img, s1, s2 in table:
        print(f"| {name} | {shape[0]} x {shape[1]} | {img} | {nl} | {nf} | {n} | {s1:.1f} | {s2:.1f} | {s1 / s2:.2f} |")
    print(" ".join(f"{k}={v}" for k, v in kv.items()))
    return kv


if __name__ == "__main__":
    main()
