"""The CPU demo: tiny backbone -> warm-up -> synthetic tasks -> SFT and LIVR -> Table 1 -> MLflow.

Everything is the real pipeline (`train_worker`, the same one Ray Train runs) on a tiny Qwen2.5-VL-class
model; only the sizes are small. Runs in a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import copy
import os
import time

from livr.backbones import resolve_backbone_path
from livr.config import load_config
from livr.evaluate import run_rows, table1
from livr.tracking import tracking_uri
from livr.train import train_worker
from livr.warmup import warm_up

# the demo's warm-up: a small "pretraining" on other synthetic tasks than the ones it fine-tunes on
WARMUP_TASKS = ["Relative_Reflectance", "Object_Localization", "Visual_Similarity", "Jigsaw"]


def run_demo(config_path: str, overrides: list[str] | None = None, warmup_steps: int = 400) -> int:
    t0 = time.time()
    cfg = load_config(config_path, overrides)
    preset = cfg.model.backbone
    print(f"[demo] 1/4 tiny backbone '{preset}' and its warm-up ({warmup_steps} steps, tasks {', '.join(WARMUP_TASKS)})")
    src = resolve_backbone_path(preset, os.path.expanduser(cfg.model.cache_dir))
    warmed = os.path.join(os.path.expanduser(cfg.model.cache_dir), f"{preset}-warm{warmup_steps}")
    warm_up(src, warmed, tasks=[t for t in WARMUP_TASKS if t not in cfg.data.tasks], steps=warmup_steps)
    cfg.model.backbone = warmed
    runs = []
    for mode in ("sft", "livr"):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.train.mode = mode
        run_cfg.name = f"{cfg.name}-{mode}"
        run_cfg.eval.zero_shot = mode == "sft"
        if mode == "sft":
            run_cfg.latents.num_latents = 0
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
    print(f"[demo] open it with:  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return 0
