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
from tqdm.auto import tqdm

from livr.backbones import resolve_backbone_path
from livr.backbones.preflight import check_before_loading
from livr.config import Config, from_dict, save_config, validate
from livr.data.loader import EncodedRows, auto_workers, checked, make_loader, micro_batches, shutdown_loaders
from livr.data.packing import check_config as check_packing
from livr.data.packing import even_packs, step_rows
from livr.data.splits import load_splits
from livr.data.tasks import DataError
from livr.method.groups import IGNORE
from livr.model import attention
from livr.model.build import build_model
from livr.model.device import resolve_device
from livr.tracking.tracker import Tracker, preflight
from livr.training.checkpoint import recover_last, save_run_artifacts, seed_rng
from livr.training.distributed import Context, setup_distributed
from livr.training.ds_setup import check_zero3_rows, zero3_loading
from livr.training.engine import gathered, make_engine, restore_best
from livr.training.evaluate import eval_loader, eval_metrics, evaluate_rows, hidden_answers, write_eval
from livr.training.faults import injected_failure, injected_nan
from livr.training.lifecycle import Lifecycle, RunStopped
from livr.training.nonfinite import NonFinite, NonFiniteError
from livr.training.perf import PerfMeter, opt_seconds
from livr.training.run_status import epoch_line, finished_message, finished_run
from livr.training.runlock import check_same_run, lock_held, run_lock
from livr.training.saving import barrier, save_best_of, save_last, stop_nonfinite, sum_across
from livr.utils.console import progress_disabled


@dataclass
class Stage:
    name: str  # stage1 | stage2 | sft
    bottleneck: bool
    steps: int  # optimizer steps in this stage
    attn: str


def plan_stages(cfg: Config, steps_per_epoch: int, kernels=None) -> list[Stage]:
    """The stages and their steps; `kernels` (livr.model.attention.AttentionPlan, resolved for the device) names each
    stage's attention kernel (else the config's names as written)."""
    t = cfg.train
    attn1 = kernels.stage1 if kernels else cfg.model.attn_implementation
    attn2 = kernels.stage2 if kernels else (cfg.model.attn_implementation_stage2 or cfg.model.attn_implementation)
    def steps(epochs: float, explicit: int) -> int:
        return explicit if explicit > 0 else round(epochs * steps_per_epoch)
    if t.mode == "sft":
        return [Stage("sft", False, steps(t.sft_epochs, t.sft_steps), attn2)]
    return [
        Stage("stage1", True, steps(t.stage1_epochs, t.stage1_steps), attn1),
        Stage("stage2", False, steps(t.stage2_epochs, t.stage2_steps), attn2),
    ]


def lr_at(step: int, total: int, cfg: Config) -> float:
    """The learning rate of optimizer step `step` (0-based) of a stage of `total` steps: linear warm-up over
    ceil(warmup_ratio * total) steps, then cosine decay to min_lr_ratio * lr, restarted for each stage.
    Exactly transformers' `get_cosine_schedule_with_warmup` (with `min_lr_rate`), as the HF Trainer steps it."""
    o = cfg.optim
    warm = math.ceil(o.warmup_ratio * total)
    if step < warm:
        return o.lr * step / max(1, warm)
    progress = (step - warm) / max(1, total - warm)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_worker(cfg: Config | dict, report: Callable[[dict, str | None], None] | None = None,
                 resume_from: str | None = None) -> dict:
    """Run one training (both stages, or SFT) and return the final metrics (rank 0's view).

    `report(metrics, checkpoint_dir)` is called after every saved checkpoint (Ray Train reports it);
    `resume_from` is a checkpoint directory to continue from (Ray's latest), else `<run>/checkpoints/last`.
    SIGINT / SIGTERM: the step finishes, a checkpoint is written, the MLflow run ends KILLED and `RunStopped`
    is raised; a crash ends it FAILED (`livr.training.lifecycle`).
    """
    cfg = validate(cfg) if isinstance(cfg, Config) else from_dict(cfg)  # (with the checks of data and backbones)
    if report is None and os.environ.get("RANK", "0") == "0" and not lock_held(cfg.run_dir):
        with run_lock(cfg.run_dir):  # running alone, this process owns the run: one live run per directory
            return train_worker(cfg, resume_from=resume_from)
    if report is None and resume_from is None and os.environ.get("WORLD_SIZE", "1") == "1":
        done = finished_run(cfg)
        if done is not None:  # nothing to resume: say so, and re-evaluate nothing
            if os.environ.get("LIVR_QUIET") != "1":
                print(finished_message(cfg), flush=True)
            return done
    life = Lifecycle(cfg.run_dir)
    try:
        return _train(cfg, report, resume_from, life)
    except RunStopped:
        shutdown_loaders()
        raise
    except BaseException as e:
        shutdown_loaders()
        life.failed(e)
        raise
    finally:
        life.release()


def _train(cfg: Config, report, resume_from: str | None, life: Lifecycle) -> dict:
    # ---------------------------------------------------------------- setup
    ctx = setup_distributed(cfg)
    attention.check(cfg, resolve_device(cfg.model.device), training=True)  # before anything loads: kernels that cannot run here
    check_before_loading(cfg)  # the backbone's config: refused models, expert LoRA without experts, kernels
    quiet = ctx.rank != 0 or os.environ.get("LIVR_QUIET") == "1"
    run_dir, ckpt_dir = cfg.run_dir, os.path.join(cfg.run_dir, "checkpoints")
    last = os.path.join(ckpt_dir, "last")
    if cfg.train.resume and resume_from is None and os.path.exists(last):
        check_same_run(cfg, os.path.join(run_dir, "config.yaml"))
    if ctx.rank == 0:
        preflight(cfg)  # an unreachable tracking server: one line now, not a hang after the model loaded
    needed = list(dict.fromkeys(["train", "val", *cfg.eval.splits]))  # a test split is loaded only if evaluated
    # one process per node downloads the backbone (or materialises a preset) and the data; the others wait (the
    # process group's distributed.timeout_s). Also in one process: a preset must be written before ZeRO-3's
    # zero.Init is active (under it the weights are partitioned and a preset would be saved empty).
    # The data first: its errors (an empty directory, a bad row) come before a backbone is downloaded or built.
    splits = load_splits(cfg, progress=not quiet, only=needed) if ctx.world == 1 else None
    if ctx.local_rank == 0:
        if ctx.world > 1:
            load_splits(cfg, only=needed)
        resolve_backbone_path(cfg.model.backbone, os.path.expanduser(cfg.model.cache_dir), cfg.model.num_layers,
                              download=True)
    barrier(ctx)
    loading = zero3_loading(cfg, ctx.world)  # (ZeRO-3: its version check; the rows' below, before the model loads)
    if splits is None:
        splits = load_splits(cfg, progress=not quiet, only=needed)
    if loading is not None:
        check_zero3_rows(splits)
    torch.manual_seed(cfg.train.seed)
    lm = build_model(cfg, loading=loading)
    check_packing(cfg, lm.attention)  # (the resolved kernels)
    if hidden_answers(splits["val"], f"data.val_split={cfg.data.val_split!r}"):
        raise DataError(f"data.val_split={cfg.data.val_split!r}: its answers are hidden (BLINK test); validation and "
                        "model selection need a split with public answers")
    if ctx.rank == 0:  # the checks passed: from here the run directory holds a run (a failed launch leaves none)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
    train_rows = splits["train"]  # memory-mapped rows: each rank encodes only its own micro-batches, on demand
    workers = auto_workers(cfg.data.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    engine = life.engine = make_engine(lm, cfg, ctx.rank, ctx.world)  # AdamW (DeepSpeed's CPU Adam when ZeRO offloads it)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * ctx.world
    steps_per_epoch = max(1, len(train_rows) // global_batch)
    stages = plan_stages(cfg, steps_per_epoch, lm.attention)
    plan = {"planned_steps": sum(s.steps for s in stages),  # what a full run uses (Tune budget accounting)
            "planned_epochs": sum(math.ceil(s.steps / steps_per_epoch) for s in stages)}
    state = {"stage": 0, "step": 0, "global_step": 0, "best": -1.0, "best_at": None, "history": []}
    source = resume_from
    if source is None and cfg.train.resume:
        if ctx.rank == 0:
            recover_last(last)  # a crash between the two renames of a checkpoint swap
        barrier(ctx)
        source = last if os.path.exists(last) else None
    if source:  # verified against its manifest; every rank restores its own RNG state
        state = engine.load(source)
        state.setdefault("resumed_from", []).append(state["global_step"])
        if ctx.rank == 0:
            where = (f"stage {state['stage'] + 1} of {len(stages)}, step {state['step']}" if state["stage"] < len(stages)
                     else "every stage trained; selecting, saving and evaluating")
            print(f"[livr] resumed from {source}: {where} (global step {state['global_step']})", flush=True)
    else:  # the training RNG starts from the seed alone (building a preset or data above may have drawn from it)
        seed_rng(cfg.train.seed)
    tracker = Tracker(cfg, ctx.rank, run_dir, run_id=state.get("mlflow_run_id"))
    if not source:
        tracker.forget_logged_steps()
    state["mlflow_run_id"] = tracker.run_id
    life.tracker, life.rank = tracker, ctx.rank
    life.install()  # from here a signal ends the step, saves and stops
    pad_id = lm.tokenizer.pad_token_id
    nonfinite = NonFinite(cfg, ctx.rank, ctx.world)
    eval_loaders: dict = {}  # per split: a persistent evaluation loader
    if cfg.eval.zero_shot and state["global_step"] == 0 and cfg.latents.num_latents == 0:
        zs = _evaluate(lm, cfg, splits, cfg.eval.splits, False, ctx, quiet, eval_loaders)
        if ctx.rank == 0:
            write_eval(os.path.join(run_dir, "eval_zero_shot.json"), zs)

    # ---------------------------------------------------------------- stages
    for si, stage in enumerate(stages):
        if si < state["stage"]:
            continue
        lm.set_attn_implementation(stage.attn)
        lm.model.train()
        bar = tqdm(total=stage.steps, initial=state["step"], desc=stage.name,
                   disable=progress_disabled(quiet), leave=False)
        batches = micro_batches(len(train_rows), seed=cfg.train.seed, stage=si, start_step=state["step"],
                                steps=stage.steps, micro_batch=cfg.train.micro_batch_size, accum=cfg.train.grad_accum,
                                world=ctx.world, rank=ctx.rank)
        pack = cfg.data.max_tokens if cfg.data.packing else 0  # one loader item per step: its packed micro-batches
        loader = iter(make_loader(EncodedRows(train_rows, lm.builder, cache_bytes=cfg.data.cache_mib << 20, split="train"),
                                  step_rows(batches, cfg.train.grad_accum) if pack else batches,
                                  pad_id, num_workers=workers if stage.steps > state["step"] else 0,
                                  pin_memory=lm.device.type == "cuda", pack=pack))
        t_last, stop = time.perf_counter(), None
        meter = PerfMeter(lm, cfg)
        while state["step"] < stage.steps:
            epoch, start = divmod(state["step"], steps_per_epoch)
            epoch_loss = []
            for k in range(start, steps_per_epoch):
                if state["step"] >= stage.steps:
                    break
                t0 = time.perf_counter()
                micro = checked(next(loader))["packed"] if pack else \
                    [checked(next(loader)) for _ in range(cfg.train.grad_accum)]  # this rank's share of step k
                meter.waited(time.perf_counter() - t0)
                train_step(lm, engine, cfg, stage, state, micro, ctx)
                meter.stepped(micro, opt_seconds(engine))
                step = engine.last  # the step's global loss and gradient norm: its one host sync (livr.training.nonfinite)
                stop = nonfinite.after_step(step, stage.name, state, micro, tracker)  # a skipped step: counted, logged
                if step.finite:
                    epoch_loss.append(step.loss)
                state["step"] += 1
                state["global_step"] += 1
                bar.update(1)
                injected_failure(state["global_step"], ctx.rank)
                if stop and state["step"] < stage.steps:  # (the last step of a stage ends its epoch first)
                    raise stop_nonfinite(engine, state, ctx, last, report, stop)
                if state["global_step"] == 1 and hasattr(engine, "memory"):  # per-rank ZeRO footprint
                    with open(os.path.join(run_dir, f"memory_rank{ctx.rank}.json"), "w") as f:
                        json.dump({**engine.memory(), "built_partitioned": getattr(loading, "built_partitioned", False)}, f)
                log_step = state["global_step"] % cfg.train.log_every == 0 or state["step"] == stage.steps
                if log_step:
                    now = time.perf_counter()
                    metrics = {f"{stage.name}/lr": engine.lr, f"{stage.name}/step_time": (now - t_last) / cfg.train.log_every}
                    if step.finite:
                        metrics[f"{stage.name}/loss"] = step.loss
                    t_last = now
                    metrics.update(meter.metrics())  # perf/* (synchronises CUDA: a log step only)
                    tracker.log_metrics(metrics, state["global_step"])
                    bar.set_postfix(loss=f"{step.loss:.3f}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}",
                                    ex_s=f"{metrics['perf/samples_per_s']:.2f}")
                every = cfg.distributed.checkpoint_every
                if every and state["global_step"] % every == 0 and state["step"] < stage.steps:
                    save_last(engine, state, ctx, last, report, {})
                # several ranks agree on a signal at log steps only (an all-reduce read on the host is a sync)
                if state["step"] < stage.steps and (log_step or ctx.world == 1) \
                        and life.stop_requested(lambda v: sum_across(v, ctx.world, lm.device)):
                    save_last(engine, state, ctx, last, report, {})  # (the last step of a stage ends its epoch first)
                    raise life.stopped(state["global_step"])
            # end of an epoch (or of the stage)
            done_before = sum(math.ceil(s.steps / steps_per_epoch) for s in stages[:si])  # earlier stages' epochs
            metrics = {"epoch": epoch + 1, "stage": si + 1, "epochs_done": done_before + epoch + 1, **plan}
            if epoch_loss:  # this epoch's (or its resumed part's) mean of the global-batch answer NLLs
                metrics["train_loss"] = sum(epoch_loss) / len(epoch_loss)  # its applied steps' global losses
            if lm.vision_cache is not None:  # this rank's: hit rate so far, entries and MiB held in memory
                metrics.update(lm.vision_cache.stats())
            if cfg.train.eval_every_epoch or state["step"] >= stage.steps:
                t_eval = time.perf_counter()
                val = _evaluate(lm, cfg, splits, ["val"], cfg.eval.bottleneck, ctx, quiet, eval_loaders)
                metrics["perf/eval_s"] = time.perf_counter() - t_eval
                acc = val["val"]["mean"]
                metrics.update({"val_accuracy": acc, f"{stage.name}/val_accuracy": acc})
                state["history"].append({"stage": stage.name, "epoch": epoch + 1, "step": state["global_step"],
                                         "val_accuracy": acc})
                if acc > state["best"]:
                    state["best"], state["best_at"] = acc, {"stage": stage.name, "epoch": epoch + 1}
                    save_best_of(engine, ckpt_dir, ctx.rank, state)
                lm.model.train()
            tracker.log_metrics(metrics, state["global_step"])
            if not quiet:  # one line per epoch: what a log file keeps
                print(epoch_line(stage, epoch, steps_per_epoch, state["global_step"], metrics), flush=True)
            done = state["step"] >= stage.steps
            if done:
                state["stage"], state["step"] = si + 1, 0
            save_last(engine, state, ctx, last, report, metrics)
            if stop:
                raise NonFiniteError(f"training stopped: {stop}")
            if life.stop_requested(lambda v: sum_across(v, ctx.world, lm.device)):
                raise life.stopped(state["global_step"])
            if done:
                break
            meter.start()  # the evaluation and the checkpoint are not part of the next window's steps
        if stage.steps == 0:
            state["stage"], state["step"] = si + 1, 0
        bar.close()

    # ---------------------------------------------------------------- save + evaluate
    return finish(lm, engine, cfg, splits, state, ctx, tracker, quiet, eval_loaders)


def train_step(lm, engine, cfg, stage: Stage, state: dict, micro: list[dict], ctx: Context) -> None:
    """One optimizer step over a global batch, of which `micro` are this rank's collated micro-batches. The engine
    reads the step's global loss and gradient norm once, together, to decide whether the step is applied
    (`engine.last`: its loss is the step's loss, summed over ranks; livr.training.nonfinite): the step's one host sync;
    nothing else in it waits for the device.

    The loss is the per-token mean answer NLL over the whole global batch (total NLL / total labelled tokens,
    both summed over ranks), so micro-batch size, accumulation and the number of ranks never change the
    gradient: each micro-batch contributes its summed NLL / the global token count, and the engine sums the
    contributions of all ranks (`livr.data.loader.micro_batches` decides which rows each rank gets). The labels
    are on the host, so the token count is too; with several ranks it is summed on the device (no read back)."""
    lr = lr_at(state["step"], stage.steps, cfg)
    tokens = float(sum(int((b["labels"] != IGNORE).sum()) for b in micro))  # host tensors: no device sync
    if ctx.world > 1:
        tokens = torch.tensor(tokens, dtype=torch.float32, device=lm.device)
        dist.all_reduce(tokens)
        tokens = tokens.clamp(min=1.0)
    else:
        tokens = max(1.0, tokens)
    even = cfg.data.packing and ctx.world > 1 and engine.collective_micro  # DeepSpeed: equal counts per rank
    fillers = even_packs(micro, lm.device) if even else []
    total, runs = None, micro + fillers  # (fillers: weight 0, so that every rank joins ZeRO's collectives alike)
    for a, batch in enumerate(runs):
        boundary = a == len(runs) - 1
        with engine.sync(boundary):
            nll, _ = lm.answer_nll(batch, stage.bottleneck, module=engine.forward_module)
            if injected_nan(state.get("global_step", 0) + 1, ctx.rank):
                nll = nll * float("nan")
            if a >= len(micro):
                nll = nll * 0.0
            else:
                total = nll.detach() if total is None else total + nll.detach()
            engine.micro_step(nll / tokens, boundary, lr, total / tokens if boundary else None)


def _evaluate(lm, cfg, splits, names, bottleneck, ctx, quiet, loaders: dict) -> dict:
    out = {}
    for n in names:
        if n not in loaders:  # built once per split: its workers and encoded prompts persist across epochs
            loaders[n] = eval_loader(lm, splits[n], cfg.eval.batch_size, ctx.rank, ctx.world,
                                          auto_workers(cfg.data.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))),
                                          cache_bytes=cfg.data.cache_mib << 20, persistent=True,
                                          group_by_length=cfg.eval.group_by_length, split=n)
        out[n] = evaluate_rows(lm, splits[n], bottleneck=bottleneck, max_new_tokens=cfg.eval.max_new_tokens,
                               rank=ctx.rank, world=ctx.world, quiet=quiet, parser=cfg.eval.parser, split=n,
                               data=loaders[n])
    return out


def finish(lm, engine, cfg, splits, state, ctx, tracker, quiet, eval_loaders: dict) -> dict:
    """Restore the selected weights, write the run's artifacts, evaluate the test splits."""
    if cfg.train.select == "best":  # verified; an unusable best falls back (one-line warning), see select_best
        restore_best(engine, os.path.join(cfg.run_dir, "checkpoints"), state, ctx.rank, ctx.world)
    lm.model.eval()
    results = _evaluate(lm, cfg, splits, cfg.eval.splits, cfg.eval.bottleneck, ctx, quiet, eval_loaders)
    final = {"best_val_accuracy": state["best"], "global_step": state["global_step"],
             "resumed_from": state.get("resumed_from", []),
             **{f"{s}_accuracy": r["mean"] for s, r in results.items()}}
    with gathered(engine, with_embeddings=True):  # ZeRO-3: whole tensors, never the empty (0,) shards
        if ctx.rank == 0:
            save_run_artifacts(lm, cfg.run_dir)
    if ctx.rank == 0:
        write_eval(os.path.join(cfg.run_dir, "eval.json"), results, meta={
            "mode": cfg.train.mode, "backbone": cfg.model.backbone, "num_latents": cfg.latents.num_latents,
            "selected": state["best_at"] if cfg.train.select == "best" else "last", "history": state["history"]})
        for split, r in results.items():
            if r["accuracy"] is None:  # hidden answers (BLINK test): no accuracy, a leaderboard file instead
                from livr.training.evaluate import write_submission

                write_submission(os.path.join(cfg.run_dir, f"blink_submission_{split}.json"), r["predictions"])
                continue
            tracker.log_metrics(eval_metrics(split, r), state["global_step"])
        tracker.log_run_dir(cfg.run_dir)
        tracker.end()
        with open(os.path.join(cfg.run_dir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=1)
    return final


__all__ = ["lr_at", "plan_stages", "train_step", "train_worker"]
