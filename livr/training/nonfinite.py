"""Non-finite steps (`train.nonfinite`, `train.max_nonfinite_skips`) and saves that refuse non-finite tensors.

The engine decides, at each optimizer step, from the step's global loss and global gradient norm, reduced over
the ranks in one tensor (`StepCheck`, the step's one host sync): a step whose loss or gradient norm is not finite
is not applied (the gradients are zeroed; under DeepSpeed ZeRO its own overflow check skips it on every rank).
Every rank takes the same decision, since it reads the same reduced numbers. `NonFinite.after_step` counts
skips (`<stage>/nonfinite_skips` in MLflow), names the step and the rows' `idx` in the log, and says when the run
must stop: at once with `train.nonfinite=stop`, or past `train.max_nonfinite_skips` consecutive skips.

No saved tensor is ever non-finite: `refuse_nonfinite` raises a one-line NonFiniteError before a checkpoint, the
best selection or the run's adapter/latents are written, so the previous checkpoint stays in place.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """The run stopped on non-finite numbers, or a save refused them (one line; `livr.training.lifecycle` appends where the
    last checkpoint is rather than printing a second line)."""

    one_line = True


@dataclass
class StepCheck:
    loss: float  # the step's global loss (summed over ranks)
    grad_norm: float  # the global gradient norm before clipping
    finite: bool
    applied: bool  # the optimizer step was taken


def check_step(step_loss: torch.Tensor | None, grad_norm, world: int) -> StepCheck:
    """Reduce [this rank's share of the loss, the (already global) gradient norm] over the ranks in one tensor and
    read it once. Any nan/inf on any rank makes the sum non-finite on every rank."""
    device = step_loss.device if step_loss is not None else torch.device("cpu")
    loss = step_loss.detach().reshape(()).to(torch.float64) if step_loss is not None \
        else torch.zeros((), dtype=torch.float64, device=device)
    norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm).to(device, torch.float64).reshape(())
    stats = torch.stack([loss, norm / world])  # the norm is the same on every rank: its sum over ranks is the norm
    if world > 1:
        dist.all_reduce(stats)
    total, gnorm = stats.tolist()
    finite = math.isfinite(total) and math.isfinite(gnorm)
    return StepCheck(total, gnorm, finite, finite)


def refuse_nonfinite(tensors: dict, what: str) -> None:
    """A one-line NonFiniteError naming `what` and the first tensor holding nan/inf; nothing is written."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"refusing to write {what}: {name} holds {bad} nan/inf value(s) of {t.numel()}; the "
                                 "weights are no longer finite (lower optim.lr, or check the data)")


def _rows(micro: list[dict]) -> str:
    rows = [m for b in micro for m in b.get("meta", [])]
    tasks = sorted({str(m.get("sub_task")) for m in rows if m.get("sub_task")})
    return f"rows {'/'.join(tasks) + ' ' if tasks else ''}idx={[m.get('idx') for m in rows]}"


class NonFinite:
    """The policy's counters live in `state` (resumed with it): `nonfinite_skips` (all) and `nonfinite_run`
    (consecutive)."""

    def __init__(self, cfg, rank: int, world: int):
        self.policy, self.limit = cfg.train.nonfinite, cfg.train.max_nonfinite_skips
        self.rank, self.world = rank, world

    def after_step(self, check: StepCheck, stage: str, state: dict, micro: list[dict], tracker) -> str | None:
        """Count a skipped step and log it; the reason to stop the run, else None. Called before `state` counts
        the step (so `state["global_step"] + 1` is this step)."""
        if check.finite:
            state["nonfinite_run"] = 0
            return None
        step = state["global_step"] + 1
        state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
        state["nonfinite_run"] = run = state.get("nonfinite_run", 0) + 1
        what = f"non-finite loss {check.loss:g} / gradient norm {check.grad_norm:g}"
        who = f"rank {self.rank}: " if self.world > 1 else ""
        done = "applied anyway (no overflow check in this DeepSpeed configuration)" if check.applied else "skipped"
        print(f"[livr] {who}{stage} step {state['step'] + 1} (global step {step}): {what}; optimizer step {done} "
              f"({run} consecutive, train.nonfinite={self.policy}, train.max_nonfinite_skips={self.limit}); "
              f"{_rows(micro)}", file=sys.stderr, flush=True)
        tracker.log_metrics({f"{stage}/nonfinite_skips": state["nonfinite_skips"]}, step)
        if check.applied:
            return f"{what} at global step {step} and DeepSpeed applied the step (use a ZeRO stage >= 1)"
        if self.policy == "stop":
            return f"{what} at global step {step} (train.nonfinite=stop)"
        if run > self.limit:
            return (f"{run} consecutive non-finite steps up to global step {step}, more than "
                    f"train.max_nonfinite_skips={self.limit} ({what})")
        return None
