"""train_worker(cfg): the one training loop. Stage 1 (bottleneck) then Stage 2 (causal), or SFT.

The same function runs in one process (`livr train`, the single-GPU mode) and on every Ray Train worker:
rank, world size and the process group come from the environment (RANK/WORLD_SIZE/LOCAL_RANK, or an
already initialised torch.distributed group). Steps: setup -> for each stage: train_step… -> evaluate
-> save. Orchestration (Ray, MLflow) stays outside the method modules; `report` is an optional callback
`report(metrics, checkpoint_dir | None)` through which Ray Train receives metrics and checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from livr.checkpoint import (
    check_complete,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    save_run_artifacts,
    trainable_state,
)
from livr.config import Config, from_dict, save_config
from livr.data.splits import load_splits
from livr.evaluate import evaluate_rows, write_eval
from livr.model import LivrModel, answer_loss, build_model, param_groups
from livr.sequence import collate
from livr.tracking import Tracker


@dataclass
class Stage:
    name: str  # stage1 | stage2 | sft
    bottleneck: bool
    steps: int  # optimizer steps in this stage
    attn: str


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int


def setup_distributed(cfg: Config) -> Context:
    """Rank/world from the environment; joins (or reuses) the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.distributed.use_gpu else "gloo")
    if cfg.model.device in ("auto", "cuda") and torch.cuda.is_available():
        cfg.model.device = f"cuda:{local}"
    return Context(rank, world, local)


def plan_stages(cfg: Config, steps_per_epoch: int) -> list[Stage]:
    t, attn2 = cfg.train, cfg.model.attn_implementation_stage2 or cfg.model.attn_implementation
    def steps(epochs: float, explicit: int) -> int:
        return explicit if explicit > 0 else round(epochs * steps_per_epoch)
    if t.mode == "sft":
        return [Stage("sft", False, steps(t.sft_epochs, t.sft_steps), attn2)]
    return [
        Stage("stage1", True, steps(t.stage1_epochs, t.stage1_steps), cfg.model.attn_implementation),
        Stage("stage2", False, steps(t.stage2_epochs, t.stage2_steps), attn2),
    ]


def lr_at(step: int, total: int, cfg: Config) -> float:
    """5% linear warm-up then cosine decay, restarted for each stage."""
    o = cfg.optim
    warm = max(1, math.ceil(o.warmup_ratio * total)) if o.warmup_ratio > 0 else 0
    if step < warm:
        return o.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _all_reduce_grads(model: torch.nn.Module, world: int) -> None:
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _mean_across(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


def encode_rows(lm: LivrModel, rows: list[dict], desc: str, quiet: bool) -> list[dict]:
    return [lm.builder.encode(r) for r in tqdm(rows, desc=desc, disable=quiet, leave=False)]


def train_worker(cfg: Config | dict, report: Callable[[dict, str | None], None] | None = None) -> dict:
    """Run one training (both stages, or SFT) and return the final metrics (rank 0's view)."""
    # ---------------------------------------------------------------- setup
    cfg = cfg if isinstance(cfg, Config) else from_dict(cfg)
    ctx = setup_distributed(cfg)
    quiet = ctx.rank != 0 or os.environ.get("LIVR_QUIET") == "1"
    run_dir, ckpt_dir = cfg.run_dir, os.path.join(cfg.run_dir, "checkpoints")
    if ctx.rank == 0:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    torch.manual_seed(cfg.train.seed)
    lm = build_model(cfg)
    splits = load_splits(cfg, progress=not quiet)
    train_items = encode_rows(lm, splits["train"], "encode train", quiet)
    tracker = Tracker(cfg, ctx.rank, run_dir)
    opt = torch.optim.AdamW(param_groups(lm.model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    mb, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    steps_per_epoch = max(1, len(train_items) // (mb * accum * ctx.world))
    stages = plan_stages(cfg, steps_per_epoch)
    state = {"stage": 0, "step": 0, "global_step": 0, "best": -1.0, "best_at": None, "history": []}
    last = os.path.join(ckpt_dir, "last")
    if cfg.train.resume and os.path.exists(last):
        state = load_checkpoint(last, lm.model, opt)
        if not quiet:
            print(f"[livr] resumed from {last}: stage {state['stage']} step {state['step']} (global {state['global_step']})")
    pad_id = lm.tokenizer.pad_token_id
    if cfg.eval.zero_shot and state["global_step"] == 0 and cfg.latents.num_latents == 0:
        zs = _evaluate(lm, cfg, splits, cfg.eval.splits, False, ctx, quiet)
        if ctx.rank == 0:
            write_eval(os.path.join(run_dir, "eval_zero_shot.json"), zs)

    # ---------------------------------------------------------------- stages
    for si, stage in enumerate(stages):
        if si < state["stage"]:
            continue
        lm.set_attn_implementation(stage.attn)
        lm.model.train()
        bar = tqdm(total=stage.steps, initial=state["step"], desc=stage.name, disable=quiet, leave=False)
        t_last = time.perf_counter()
        while state["step"] < stage.steps:
            epoch, start = divmod(state["step"], steps_per_epoch)
            gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + si * 100 + epoch)
            order = torch.randperm(len(train_items), generator=gen).tolist()[ctx.rank :: ctx.world]
            for k in range(start, steps_per_epoch):
                if state["step"] >= stage.steps:
                    break
                loss = train_step(lm, opt, cfg, stage, state, train_items, order, k, pad_id, ctx)
                state["step"] += 1
                state["global_step"] += 1
                bar.update(1)
                _injected_failure(state["global_step"], ctx.rank)
                if state["global_step"] % cfg.train.log_every == 0 or state["step"] == stage.steps:
                    now = time.perf_counter()
                    metrics = {f"{stage.name}/loss": _mean_across(loss, ctx.world),
                               f"{stage.name}/lr": opt.param_groups[0]["lr"],
                               f"{stage.name}/step_time": (now - t_last) / cfg.train.log_every}
                    t_last = now
                    tracker.log_metrics(metrics, state["global_step"])
                    bar.set_postfix(loss=f"{metrics[f'{stage.name}/loss']:.3f}")
                every = cfg.distributed.checkpoint_every
                if every and state["global_step"] % every == 0 and state["step"] < stage.steps:
                    _save(lm, opt, cfg, state, ctx, last, report, {})
            # end of an epoch (or of the stage)
            metrics = {"epoch": epoch + 1, "stage": si + 1}
            if cfg.train.eval_every_epoch or state["step"] >= stage.steps:
                val = _evaluate(lm, cfg, splits, ["val"], cfg.eval.bottleneck, ctx, quiet)
                acc = val["val"]["mean"]
                metrics.update({"val_accuracy": acc, f"{stage.name}/val_accuracy": acc})
                state["history"].append({"stage": stage.name, "epoch": epoch + 1, "step": state["global_step"], "val_accuracy": acc})
                if acc > state["best"]:
                    state["best"], state["best_at"] = acc, {"stage": stage.name, "epoch": epoch + 1}
                    if ctx.rank == 0:
                        _save_best(lm, ckpt_dir)
                lm.model.train()
            tracker.log_metrics(metrics, state["global_step"])
            done = state["step"] >= stage.steps
            if done:
                state["stage"], state["step"] = si + 1, 0
            _save(lm, opt, cfg, state, ctx, last, report, metrics)
            if done:
                break
        if stage.steps == 0:
            state["stage"], state["step"] = si + 1, 0
        bar.close()

    # ---------------------------------------------------------------- save + evaluate
    return finish(lm, cfg, splits, state, ctx, tracker, quiet)


def train_step(lm, opt, cfg, stage: Stage, state: dict, items, order, k: int, pad_id: int, ctx: Context) -> float:
    """One optimizer step: `grad_accum` micro-batches of NLL on answer tokens, clip, AdamW."""
    mb, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    total = 0.0
    for a in range(accum):
        idx = order[(k * accum + a) * mb : (k * accum + a + 1) * mb]
        batch = collate([items[i] for i in idx], pad_id)
        logits = lm.forward(batch, bottleneck=stage.bottleneck)
        loss = answer_loss(logits, batch["labels"]) / accum
        loss.backward()
        total += loss.item()
    if ctx.world > 1:
        _all_reduce_grads(lm.model, ctx.world)
    params = [p for g in opt.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
    lr = lr_at(state["step"], stage.steps, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def _injected_failure(global_step: int, rank: int) -> None:
    """Test hook: LIVR_FAIL_AT_STEP=N [LIVR_FAIL_RANK=r] [LIVR_FAIL_MODE=raise|exit] [LIVR_FAIL_MARKER=file]
    makes rank r fail once after optimizer step N (the marker file records that it already failed)."""
    at = os.environ.get("LIVR_FAIL_AT_STEP")
    if not at or int(at) != global_step or int(os.environ.get("LIVR_FAIL_RANK", "0")) != rank:
        return
    marker = os.environ.get("LIVR_FAIL_MARKER")
    if marker:
        if os.path.exists(marker):
            return
        open(marker, "w").close()
    if os.environ.get("LIVR_FAIL_MODE") == "exit":
        os._exit(17)
    raise RuntimeError(f"injected failure at step {global_step} (LIVR_FAIL_AT_STEP)")


def _evaluate(lm, cfg, splits, names, bottleneck, ctx, quiet) -> dict:
    return {
        n: evaluate_rows(lm, splits[n], bottleneck=bottleneck, batch_size=cfg.eval.batch_size,
                         max_new_tokens=cfg.eval.max_new_tokens, rank=ctx.rank, world=ctx.world, quiet=quiet)
        for n in names
    }


def _save(lm, opt, cfg, state, ctx, last, report, metrics) -> None:
    if ctx.rank == 0:
        save_checkpoint(last, lm.model, opt, state)
    if ctx.world > 1:
        dist.barrier()
    if report is not None:
        report({**metrics, "global_step": state["global_step"]}, last)


def _save_best(lm, ckpt_dir: str) -> None:
    path = os.path.join(ckpt_dir, "best.safetensors")
    os.makedirs(ckpt_dir, exist_ok=True)
    save_file(trainable_state(lm.model), path + ".tmp")
    os.replace(path + ".tmp", path)


def finish(lm, cfg, splits, state, ctx, tracker, quiet) -> dict:
    """Restore the selected weights, write the run's artifacts, evaluate the test splits."""
    best = os.path.join(cfg.run_dir, "checkpoints", "best.safetensors")
    if cfg.train.select == "best" and os.path.exists(best):
        load_trainable_state(lm.model, load_file(best), best)
    lm.model.eval()
    results = _evaluate(lm, cfg, splits, cfg.eval.splits, cfg.eval.bottleneck, ctx, quiet)
    final = {"best_val_accuracy": state["best"], "global_step": state["global_step"],
             **{f"{s}_accuracy": r["mean"] for s, r in results.items()}}
    if ctx.rank == 0:
        save_run_artifacts(lm, cfg.run_dir)
        write_eval(os.path.join(cfg.run_dir, "eval.json"), results, meta={
            "mode": cfg.train.mode, "backbone": cfg.model.backbone, "num_latents": cfg.latents.num_latents,
            "selected": state["best_at"] if cfg.train.select == "best" else "last", "history": state["history"]})
        for split, r in results.items():
            tracker.log_metrics({f"{split}_accuracy": r["mean"], **{f"{split}/{t}": a for t, a in r["accuracy"].items()}},
                                state["global_step"])
        tracker.log_run_dir(cfg.run_dir)
        tracker.end()
        with open(os.path.join(cfg.run_dir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=1)
    return final


__all__ = ["check_complete", "lr_at", "plan_stages", "train_step", "train_worker"]
