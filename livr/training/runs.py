"""A saved run directory: reload it (config + base + latents + adapter) and evaluate it."""
from __future__ import annotations

import os

from livr.config import load_config
from livr.training.checkpoint import CheckpointError

RUN_FILES = ("config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors")


def check_run_dir(run_dir: str) -> None:
    """A one-line CheckpointError for a run directory that does not exist (with the nearest existing run of its
    parent as a did-you-mean) or lacks a finished run's files."""
    if not os.path.isdir(run_dir):
        import difflib

        parent, name = os.path.split(os.path.normpath(run_dir))
        runs = sorted(d for d in os.listdir(parent or ".") if os.path.isdir(os.path.join(parent or ".", d))) \
            if os.path.isdir(parent or ".") else []
        close = difflib.get_close_matches(name, runs, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(os.path.join(parent, c) for c in close)}?)" if close else \
            (f" (runs in {parent or '.'}: {', '.join(runs[:8])})" if runs else "")
        raise CheckpointError(f"no such run: {run_dir}{hint}")
    missing = [f for f in RUN_FILES if not os.path.isfile(os.path.join(run_dir, f))]
    if missing:
        raise CheckpointError(f"run directory {run_dir} is incomplete (missing {', '.join(missing)})")


def load_run(run_dir: str, overrides: list[str] | None = None, trainable: bool = False, needs_data: bool = False):
    """(cfg, LivrModel) of a finished run; a clear error if the directory is missing or incomplete, or (`needs_data`)
    if its data source is gone, before the model loads."""
    check_run_dir(run_dir)
    from livr.config import check_data_paths
    from livr.model.build import build_model

    cfg = load_config(os.path.join(run_dir, "config.yaml"), overrides)
    if needs_data:
        check_data_paths(cfg)
    return cfg, build_model(cfg, adapter_dir=os.path.join(run_dir, "adapter"), trainable=trainable)


def evaluate_run(run_dir: str, split: str = "test", bottleneck: bool = False, overrides: list[str] | None = None) -> dict:
    from livr.data.splits import load_splits
    """Evaluate `split` of a finished run with its config (`eval.parser` scores it) and write
    `<run>/eval_<split>[_bottleneck].json`; a split whose answers are hidden (BLINK test) has no accuracy and
    gets `<run>/blink_submission_<split>[_bottleneck].json`, BLINK's leaderboard file (path in "submission")."""
    from livr.training.evaluate import evaluate_rows, write_eval, write_submission

    cfg, lm = load_run(run_dir, overrides, needs_data=True)
    rows = load_splits(cfg, only=[split])[split]
    res = evaluate_rows(lm, rows, bottleneck=bottleneck, batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens, quiet=False, parser=cfg.eval.parser, split=split)
    suffix = f"{split}{'_bottleneck' if bottleneck else ''}"
    path = os.path.join(run_dir, f"eval_{suffix}.json")
    write_eval(path, {split: res}, meta={"mode": cfg.train.mode, "num_latents": cfg.latents.num_latents})
    res["path"] = path
    from livr.training.evaluate import run_label

    res["label"] = run_label(cfg.train.mode, cfg.latents.num_latents)
    if res["accuracy"] is None:
        res["submission"] = write_submission(os.path.join(run_dir, f"blink_submission_{suffix}.json"), res["predictions"])
    return res
