"""What a run says about itself on the console: a finished run re-launched, one line per epoch."""
from __future__ import annotations

import json
import math
import os

from livr.config import Config
from livr.training.checkpoint import verify_checkpoint
from livr.training.runlock import check_same_run


def finished_run(cfg: Config) -> dict | None:
    """The final metrics of the finished run in `cfg.run_dir` that `train.resume` would continue (its last
    checkpoint is past its last stage and final_metrics.json is of the same global step), else None. A different
    config there is `check_same_run`'s one-line error."""
    last = os.path.join(cfg.run_dir, "checkpoints", "last")
    if not cfg.train.resume or not os.path.isfile(os.path.join(cfg.run_dir, "final_metrics.json")):
        return None
    verify_checkpoint(last)  # a damaged checkpoint is its one-line error, finished or not
    try:
        with open(os.path.join(last, "state.json")) as f:
            state = json.load(f)
        with open(os.path.join(cfg.run_dir, "final_metrics.json")) as f:
            final = json.load(f)
    except (OSError, ValueError):
        return None
    if state.get("stage", 0) < (1 if cfg.train.mode == "sft" else 2) or final.get("global_step") != state.get("global_step"):
        return None
    check_same_run(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    return final


def finished_message(cfg: Config) -> str:
    return (f"[livr] run already finished: {cfg.run_dir} (results: {os.path.join(cfg.run_dir, 'eval.json')}); nothing "
            "trained or evaluated. To train again: name=OTHER_NAME, or train.resume=false to start over in this "
            f"directory; to re-evaluate: livr eval --run {cfg.run_dir}")


def epoch_line(stage, epoch: int, steps_per_epoch: int, global_step: int, metrics: dict) -> str:
    """`[livr] stage1 epoch 2/4 (global step 8): loss 1.2345, val_accuracy 0.5000`"""
    parts = [f"loss {metrics['train_loss']:.4f}"] if "train_loss" in metrics else []
    if "val_accuracy" in metrics:
        parts.append(f"val_accuracy {metrics['val_accuracy']:.4f}")
    epochs = max(1, math.ceil(stage.steps / steps_per_epoch))
    return f"[livr] {stage.name} epoch {epoch + 1}/{epochs} (global step {global_step}): {', '.join(parts) or '-'}"
