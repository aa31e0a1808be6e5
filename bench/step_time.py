"""Stage-1 step time vs SFT step time (same backbone, batch, sequence length), and the share of a step
spent building batches and masks. Prints a table. Targets: ratio <= 1.05, share < 5%.

    python bench/step_time.py [--backbone tiny-qwen2.5-vl] [--batch 16] [--steps 20]
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from livr.config import load_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.method.mask import bottleneck_mask
from livr.model.build import answer_loss, build_model, param_groups


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="tiny-qwen2.5-vl")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--cache-dir", default="~/.cache/livr/backbones")
    a = ap.parse_args()
    cfg = load_config(None, [f"model.backbone={a.backbone}", f"latents.num_latents={a.latents}",
                             f"model.cache_dir={a.cache_dir}"])
    lm = build_model(cfg)
    opt = torch.optim.AdamW(param_groups(lm.model, 0.01), lr=1e-4)
    rows = generate_task("Counting", a.batch * 4, seed=0)
    items = [lm.builder.encode(r) for r in rows]
    pad = lm.tokenizer.pad_token_id

    def step(i, bottleneck, timers):
        t0 = time.perf_counter()
        batch = collate(items[(i % 4) * a.batch:(i % 4 + 1) * a.batch], pad)
        inputs = lm.model_inputs(batch, bottleneck)  # builds the 4-D mask + positions for Stage 1
        t1 = time.perf_counter()
        loss = answer_loss(lm.model(**inputs, use_cache=False).logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        timers["prep"].append(t1 - t0)
        timers["total"].append(t2 - t0)

    res = {}
    for name, bottleneck in (("sft (2-D causal)", False), ("stage 1 (4-D bottleneck)", True)) * 2:
        timers = {"prep": [], "total": []}
        for i in range(3):
            step(i, bottleneck, {"prep": [], "total": []})  # warm-up
        for i in range(a.steps):
            step(i, bottleneck, timers)
        res[name] = timers  # the second (interleaved) pass overwrites the first: less warm-up bias
    seq = items[0]["input_ids"].shape[0]
    sft, s1 = res["sft (2-D causal)"], res["stage 1 (4-D bottleneck)"]
    med = statistics.median
    t_mask = []
    g = collate(items[: a.batch], pad)["groups"]
    for _ in range(50):
        t0 = time.perf_counter()
        bottleneck_mask(g, torch.float32)
        t_mask.append(time.perf_counter() - t0)
    print(f"backbone {a.backbone}, K={a.latents}, batch {a.batch}, sequence ~{seq} tokens, {a.steps} steps, "
          f"{torch.get_num_threads()} threads")
    print("| path | step (ms, median) | batch+mask build (ms) | build share |")
    print("|---|---|---|---|")
    for name, t in res.items():
        print(f"| {name} | {1e3 * med(t['total']):.1f} | {1e3 * med(t['prep']):.2f} | {100 * med(t['prep']) / med(t['total']):.1f}% |")
    ratio = med(s1["total"]) / med(sft["total"])
    print(f"\nStage-1 / SFT step time: {ratio:.3f} (target <= 1.05); 4-D mask alone: {1e3 * med(t_mask):.2f} ms")


if __name__ == "__main__":
    main()
