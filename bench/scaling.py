"""Ray Train scaling on this machine: throughput of 1 vs 2 workers (ZeRO-2) on the same global batch, and
per-rank parameter + optimizer-state bytes under ZeRO-0/2/3 at 2 ranks. Prints a table.

    python bench/scaling.py [--steps 12] [--global-batch 8]

CPU gloo on a 2-core machine measures the plumbing, not GPU speed-up: both workers share two cores.
"""
import argparse
import json
import os
import statistics
import tempfile

for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LIVR_QUIET": "1",
             "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}.items():
    os.environ.setdefault(k, v)

from livr.cluster.ray_train import run_distributed
from livr.config import load_config


def run(tmp, name, workers, accum, mb, steps, ds):
    cfg = load_config(None, [
        f"name={name}", f"output_dir={tmp}/runs", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.artifact_location={tmp}/art", "data.train_size=64", "data.val_size=4", "data.test_size=4",
        f"train.micro_batch_size={mb}", f"train.grad_accum={accum}", f"train.stage1_steps={steps}",
        "train.stage2_steps=1", "train.log_every=1", "latents.num_latents=8", f"distributed.num_workers={workers}",
        f"distributed.deepspeed={ds}", "eval.splits=[val]"])
    run_distributed(cfg)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    rid = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name).info.run_id
    times = [m.value for m in client.get_metric_history(rid, "stage1/step_time")][2:]  # skip warm-up steps
    mem = []
    for r in range(workers):
        with open(os.path.join(cfg.run_dir, f"memory_rank{r}.json")) as f:
            mem.append(json.load(f))
    return statistics.median(times), mem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--global-batch", type=int, default=8)
    a = ap.parse_args()
    import ray

    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "LIVR_QUIET", "DS_ACCELERATOR")}})
    tmp = tempfile.mkdtemp(prefix="livr-scaling-")
    with open("deepspeed_configs/zero3.json") as f:
        z3 = json.load(f)
    z3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    z0 = {"zero_optimization": {"stage": 0}}
    paths = {"zero0": os.path.join(tmp, "z0.json"), "zero2": "deepspeed_configs/zero2.json",
             "zero3": os.path.join(tmp, "z3.json")}
    for name, ds in (("zero0", z0), ("zero3", z3)):
        with open(paths[name], "w") as f:
            json.dump(ds, f)
    try:
        g = a.global_batch
        t1, _ = run(tmp, "w1", 1, 2, g // 2, a.steps, paths["zero2"])
        t2, mem2 = run(tmp, "w2", 2, 1, g // 2, a.steps, paths["zero2"])
        mems = {"zero2": mem2}
        for z in ("zero0", "zero3"):
            mems[z] = run(tmp, z, 2, 1, g // 2, 3, paths[z])[1]
    finally:
        ray.shutdown()
    print(f"global batch {g}, tiny-qwen2.5-vl, K=8, 2 CPU cores, gloo\n")
    print("| workers (ZeRO-2) | step time (s, median) | examples/s |")
    print("|---|---|---|")
    print(f"| 1 (accumulation 2) | {t1:.3f} | {g / t1:.1f} |")
    print(f"| 2 (accumulation 1) | {t2:.3f} | {g / t2:.1f} |")
    print("\n| ZeRO stage (2 ranks) | params / rank (KiB) | optimizer state / rank (KiB) |")
    print("|---|---|---|")
    for z, m in mems.items():
        params = " / ".join(f"{r['param_bytes'] / 1024:.0f}" for r in m)
        opt = " / ".join(f"{r['optimizer_bytes'] / 1024:.1f}" for r in m)
        print(f"| {z} | {params} | {opt} |")


if __name__ == "__main__":
    main()
