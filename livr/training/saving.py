"""The training loop's saves: the resumable checkpoint (`save_last`), the best selection (`save_best_of`) and the
stop on non-finite steps (`stop_nonfinite`), with the collectives every rank takes part in."""
from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from livr.training.checkpoint import save_best, swap_into_place, trainable_state
from livr.training.engine import gathered
from livr.training.nonfinite import NonFiniteError
from livr.utils.atomic import WriteError, write_failed


def sum_across(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL groups reduce device tensors only
    dist.all_reduce(t)
    return t.item()


def barrier(ctx) -> None:
    if ctx.world > 1:
        dist.barrier()


def save_last(engine, state, ctx, last, report, metrics) -> None:
    """Write the resumable checkpoint into `last.tmp-N` (every rank takes part in the gathers, rank 0 writes,
    manifest last), swap it into place as `last` (`recover_last` repairs a crash mid-swap), then report it. A failed
    write removes `last.tmp-N` and raises WriteError on every rank; `last` is untouched."""
    tmp = f"{last}.tmp-{state['global_step']}"
    if ctx.rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier(ctx)
    failed = None
    try:
        engine.save(tmp, state)
    except Exception as e:  # noqa: BLE001 - a failed write (disk full, EIO, a size limit; a refusal): `last` stays, the partial
        failed = write_failed(e, tmp) or e  # copy goes, and every rank learns it (no rank waits in a collective)
    if sum_across(float(failed is not None), ctx.world, next(engine.model.parameters()).device):  # every rank learns it
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise failed or WriteError(f"could not write {tmp} (another rank's write failed)")
    if ctx.rank == 0:
        swap_into_place(tmp, last)
    barrier(ctx)
    if report is not None:
        report({**metrics, "global_step": state["global_step"], "stage_index": state["stage"]}, last)


def save_best_of(engine, ckpt_dir: str, rank: int, state: dict) -> None:
    """best.safetensors + best.json (sha256, val accuracy, where); the previous best is kept as best.prev.*"""
    with gathered(engine):
        tensors = trainable_state(engine.model)
    if rank == 0:
        save_best(ckpt_dir, tensors, {"val_accuracy": state["best"], **state["best_at"], "global_step": state["global_step"]})


def stop_nonfinite(engine, state, ctx, last, report, why: str) -> NonFiniteError:
    """Checkpoint the last finite state (skipped steps changed nothing; if an applied step made the weights
    non-finite the save refuses and the previous checkpoint stays) and return the one-line error to raise."""
    try:
        save_last(engine, state, ctx, last, report, {})
    except NonFiniteError:
        pass
    return NonFiniteError(f"training stopped: {why}")
