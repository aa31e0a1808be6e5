"""The cost of the Stage-1 bottleneck on a hybrid (Gated DeltaNet + full attention) backbone, on CPU.

A Stage-1 step runs each Gated DeltaNet layer's recurrence twice (the stock one and the image-blind one, as one
batch of 2B: livr/backbones/gated_deltanet.py) and the full-attention layers under an additive 4-D mask; a Stage-2
step is the stock model under the 2-D mask. Measured: one training step (forward + backward of the answer loss,
LoRA + latent rows trainable) of a padded batch, median of `--repeat` after a warm-up, for each preset given.

    python bench/hybrid_cost.py [--presets tiny-qwen3.5 tiny-qwen3.5-moe] [--batch 4] [--repeat 5]

Prints a table and, last, one `key=value` line (stage1_over_stage2_<preset>=<ratio> ...; target <= 1.5).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from livr.config import load_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.model.build import build_model


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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny-qwen3.5"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--num-layers", type=int, default=0, help="model.num_layers (a size preset at this depth)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows_out, kv = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            cfg = load_config(None, [f"model.backbone={preset}", f"model.cache_dir={tmp}/bb", f"data.cache_dir={tmp}/d",
                                     f"output_dir={tmp}/runs", "latents.num_latents=4", "tracking.enabled=false",
                                     f"model.num_layers={args.num_layers}"])
            lm = build_model(cfg)
            lm.model.train()
            rows = (generate_task("Visual_Similarity", args.batch // 2, seed=1)
                    + generate_task("Counting", args.batch - args.batch // 2, seed=1))
            batch = collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id)
            s1, s2 = step_ms(lm, batch, args.repeat)
            types = lm.model.get_base_model().config.get_text_config().layer_types
            rows_out.append((preset, tuple(batch["input_ids"].shape), types.count("linear_attention"),
                             types.count("full_attention"), s1, s2))
            kv[f"stage1_over_stage2_{preset}"] = f"{s1 / s2:.3f}"
    print(f"Stage-1 vs Stage-2 training step (fwd + bwd, LoRA + latents), CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeat}")
    print("| preset | batch x L | linear layers | full layers | Stage 1 ms | Stage 2 ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for preset, shape, nl, nf, s1, s2 in rows_out:
        print(f"| {preset} | {shape[0]} x {shape[1]} | {nl} | {nf} | {s1:.1f} | {s2:.1f} | {s1 / s2:.2f} |")
    print(" ".join(f"{k}={v}" for k, v in kv.items()))
    return kv


if __name__ == "__main__":
    main()
