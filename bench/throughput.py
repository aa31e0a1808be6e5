"""Packing and length-grouped evaluation, measured on CPU (issue 29 #4).

Real-size part (no weights): BLINK-like rows (the paper's nine tasks' image counts 1-3, plus 4-image rows; each
image 512-1024 px a side, random aspect) are counted for `--backbone` (default size-qwen2.5-vl-3b, depth 2:
its real tokenizer, chat template and image processor; `livr.tools.plan_data.row_cost`, the arithmetic `livr plan`
uses). From those lengths:
  - forwards per optimizer step at the paper's batch (micro-batch 1 x 8 accumulation = 8 forwards) vs packed with
    `data.max_tokens` (default 16384; first-fit decreasing, livr/data/packing.py), mean over `--steps` steps;
  - the padding fraction of evaluation batches (eval.batch_size 8) without / with length grouping.
Model part (a stand-in: a real-size step does not fit a shared 2-core CPU in minutes): one real `train_step`
of 8 examples on `--model` (default tiny-qwen2.5-vl, 112-px images) unpacked and packed, with max_tokens scaled
so that the stand-in's packs hold as many examples as the real-size packs do (16384 x mean stand-in length /
mean real length): the packed/unpacked gradient's max relative difference, and ATen operator calls per
optimizer step (torch.profiler, CPU: the launch-overhead proxy for a GPU), packed / unpacked.

    python bench/throughput.py [--backbone size-qwen2.5-vl-3b] [--num-layers 2] [--model tiny-qwen2.5-vl]
                               [--rows 256] [--steps 16] [--max-tokens 16384] [--stage 1]

Last line: forwards_per_step_unpacked=… forwards_per_step_packed=… packed_grad_max_rel_diff=… ops_per_step_ratio=…
eval_pad_fraction_ungrouped=… eval_pad_fraction_grouped=…  (targets: packed forwards <= 1/4 of unpacked; gradient
difference <= 1e-5; ops ratio <= 0.35; grouped padding <= 1/2 of ungrouped).
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile

import torch

from livr.config import load_config
from livr.data.lengths import grouped_batches, pad_fraction
from livr.data.packing import collate_packed, plan_packs
from livr.data.sequence import collate
from livr.data.synthetic import generate_task

IMAGES_PER_TASK = (1, 3, 1, 2, 3, 2, 2, 1, 3, 4)  # the paper's nine tasks (BLINK), and some 4-image rows
TASKS = ("Counting", "Jigsaw", "Object_Localization", "Relative_Reflectance", "Visual_Similarity")


def blink_like(n: int, seed: int = 0) -> list[dict]:
    """n rows: a synthetic task's prompt and answer, k images of (w, h) in 512..1024 (sizes only)."""
    rng = random.Random(seed)
    base = [r for t in TASKS for r in generate_task(t, 8, seed=seed, image_size=112)]  # prompts and answers
    out = []
    for i in range(n):
        k = IMAGES_PER_TASK[i % len(IMAGES_PER_TASK)]
        r = base[i % len(base)]
        out.append({"sizes": [(rng.randint(512, 1024), rng.randint(512, 1024)) for _ in range(k)],
                    "prompt": r["prompt"], "answer": r["answer"]})
    return out


def real_lengths(args, rows) -> tuple[list[int], list[int]]:
    """(training lengths, evaluation prompt lengths) of `rows` for the real-size backbone."""
    from livr.tools.plan_data import backbone_io, row_cost

    cfg = load_config(None, [f"model.backbone={args.backbone}", f"model.num_layers={args.num_layers}"])
    io = backbone_io(cfg)
    k = cfg.latents.num_latents
    train = [row_cost(io, r["sizes"], r["prompt"], r["answer"].strip("()"), k)["seq_len"] for r in rows]
    prompt = [row_cost(io, r["sizes"], r["prompt"], "", k) for r in rows]
    return train, [c["seq_len"] - c["labelled"] for c in prompt]


def eval_padding(lengths: list[int], batch: int = 8) -> tuple[float, float]:
    plain = [list(range(i, min(i + batch, len(lengths)))) for i in range(0, len(lengths), batch)]
    grouped, scored = grouped_batches(lengths, batch)
    return pad_fraction(plain, [len(b) for b in plain], lengths), pad_fraction(grouped, scored, lengths)


def model_step(lm, cfg, micro, bottleneck: bool, profile: bool = False):
    """One real train_step: (gradients the optimizer steps with, ATen calls) — the optimizer itself runs too."""
    from livr.model.build import param_groups
    from livr.training.engine import TorchEngine
    from livr.training.train import Context, Stage, train_step

    opt = torch.optim.AdamW(param_groups(lm.model, 0.01), lr=1e-3)
    grads = {}
    opt.register_step_pre_hook(lambda o, a, k: grads.update(
        {n: p.grad.detach().clone() for n, p in lm.model.named_parameters() if p.grad is not None}))
    engine = TorchEngine(lm.model, opt, cfg, 0, 1)
    stage = Stage("stage1" if bottleneck else "stage2", bottleneck, 4, "sdpa")
    if not profile:
        train_step(lm, engine, cfg, stage, {"step": 1}, micro, Context(0, 1, 0))
        return grads, 0
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        train_step(lm, engine, cfg, stage, {"step": 1}, micro, Context(0, 1, 0))
    return grads, sum(e.count for e in p.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="size-qwen2.5-vl-3b")
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--model", default="tiny-qwen2.5-vl")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--stage", type=int, default=1, choices=(1, 2))
    args = ap.parse_args()

    rows = blink_like(args.rows)
    train_len, prompt_len = real_lengths(args, rows)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    steps = [order[s * args.batch:(s + 1) * args.batch] for s in range(min(args.steps, len(rows) // args.batch))]
    packs = [len(plan_packs([train_len[i] for i in s], args.max_tokens)) for s in steps]
    fw_unpacked, fw_packed = float(args.batch), statistics.mean(packs)
    pad_plain, pad_grouped = eval_padding(prompt_len, args.batch)
    print(f"real-size rows ({args.backbone}, depth {args.num_layers}): training length min {min(train_len)} "
          f"median {int(statistics.median(train_len))} max {max(train_len)}; packs per step {packs}")

    from livr.model.build import build_model

    with tempfile.TemporaryDirectory() as tmp:
        over = [f"model.backbone={args.model}", f"model.cache_dir={tmp}/bb", "lora.dropout=0.0", "model.device=cpu",
                "train.micro_batch_size=1", f"train.grad_accum={args.batch}", "tracking.enabled=false"]
        cfg = load_config(None, over)
        small = [r for t in TASKS for r in generate_task(t, 4, seed=1, image_size=112)][: args.batch * 2]
        lm = build_model(cfg)
        items = [lm.builder.encode(r) for r in small[: args.batch]]
        lengths = [it["input_ids"].shape[0] for it in items]
        scaled = round(args.max_tokens * statistics.mean(lengths) / statistics.mean(train_len))
        pad = lm.tokenizer.pad_token_id
        unpacked = [collate([it], pad) for it in items]
        packed = collate_packed([dict(it) for it in items], pad, max(scaled, max(lengths)))
        bottleneck = args.stage == 1
        g_u, _ = model_step(lm, cfg, unpacked, bottleneck)
        lm = build_model(cfg)  # the same initial weights
        g_p, _ = model_step(lm, cfg, packed, bottleneck)
        rel = max(float((g_p[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in g_u.items())
        ops_u = model_step(build_model(cfg), cfg, unpacked, bottleneck, profile=True)[1]
        ops_p = model_step(build_model(cfg), cfg, packed, bottleneck, profile=True)[1]
    print(f"stand-in {args.model}: 8 examples of {min(lengths)}-{max(lengths)} tokens, max_tokens {scaled} -> "
          f"{len(packed)} packs; ATen calls per step unpacked {ops_u}, packed {ops_p}")
    print("| measure | unpacked / ungrouped | packed / grouped |\n|---|---|---|")
    print(f"| forwards per optimizer step ({args.backbone}) | {fw_unpacked:.0f} | {fw_packed:.2f} |")
    print(f"| ATen calls per step ({args.model}) | {ops_u} | {ops_p} |")
    print(f"| eval padding fraction, batch {args.batch} ({args.backbone}) | {pad_plain:.3f} | {pad_grouped:.3f} |")
    print(f"forwards_per_step_unpacked={fw_unpacked:.0f} forwards_per_step_packed={fw_packed:.2f} "
          f"packed_grad_max_rel_diff={rel:.2e} ops_per_step_ratio={ops_p / ops_u:.3f} "
          f"eval_pad_fraction_ungrouped={pad_plain:.3f} eval_pad_fraction_grouped={pad_grouped:.3f}")


if __name__ == "__main__":
    main()
