"""The CPU demo: tiny backbone -> warm-up -> synthetic tasks -> SFT and LIVR -> Table 1 -> MLflow.

Everything is the real pipeline (`train_worker`, the same one Ray Train runs) on a tiny Qwen2.5-VL-class
model; only the sizes are small. Runs in a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import copy
import os
import shutil
import time

from livr.backbones import resolve_backbone_path
from livr.config import load_config
from livr.tools.warmup import warm_up
from livr.tracking.tracker import tracking_uri
from livr.training.evaluate import run_rows, table1
from livr.training.train import train_worker


def run_demo(config_path: str, overrides: list[str] | None = None, warmup_steps: int = 300) -> int:
    t0 = time.time()
    cfg = load_config(config_path, overrides)
    preset, d = cfg.model.backbone, cfg.data
    print(f"[demo] 1/4 tiny backbone '{preset}', warmed up by a full fine-tune of {warmup_steps} steps on its own "
          f"'warmup' split of {', '.join(d.tasks)} (the stand-in for a pretrained VLM)")
    src = resolve_backbone_path(preset, os.path.expanduser(cfg.model.cache_dir))
    warmed = os.path.join(os.path.expanduser(cfg.model.cache_dir), f"{preset}-demo-warm")
    warm_up(src, warmed, tasks=d.tasks, steps=warmup_steps, image_size=d.image_size, options=d.options)
    cfg.model.backbone = warmed
    runs = []
    for mode in ("sft", "livr"):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.train.mode = mode
        run_cfg.name = f"{cfg.name}-{mode}"
        run_cfg.eval.zero_shot = mode == "sft"
        if mode == "sft":
            run_cfg.latents.num_latents = 0
        if os.path.isdir(run_cfg.run_dir):  # the demo always trains anew (a real run would resume)
            print(f"[demo]     removing the previous demo run {run_cfg.run_dir}")
            shutil.rmtree(run_cfg.run_dir)
        step = 2 if mode == "sft" else 3
        print(f"[demo] {step}/4 training {mode.upper()} on {', '.join(cfg.data.tasks)} -> {run_cfg.run_dir}")
        result = train_worker(run_cfg)
        print(f"[demo]     {mode}: test accuracy {result['test_accuracy']:.3f} (best val {result['best_val_accuracy']:.3f})")
        runs.append(run_cfg.run_dir)
    print("[demo] 4/4 results (test split, accuracy %):\n")
    table = table1(run_rows(runs))
    print(table)
    with open(os.path.join(os.path.dirname(runs[0]), "demo_table.md"), "w") as f:
        f.write(table + "\n")
    uri = tracking_uri(cfg)
    print(f"\n[demo] done in {time.time() - t0:.0f} s. Runs: {', '.join(runs)}")
    print(f"[demo] MLflow store: {uri} (experiment '{cfg.tracking.experiment}')")
    print(f"[demo] open it with:  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return 0
