"""Ray Tune over train_worker: real Ray, real MLflow sqlite store; every cluster is shut down."""
import os
import subprocess
import sys

import pytest
from conftest import tiny_overrides

from livr.config import ConfigError, load_config

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LIVR_QUIET": "1",
       "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def _sweep_args(backbone_cache, data_cache, tmp_path, **extra):
    base = {"name": "sweep", "data.train_size": 16, "train.micro_batch_size": 8, "train.grad_accum": 1,
            "train.stage1_epochs": 2, "train.stage2_epochs": 2, "eval.splits": "[val]",
            "tune.metric": "train_loss", "tune.mode": "min", "tune.max_concurrent_trials": 1,
            # good learning rates first, so that the useless ones meet a cutoff at ASHA's first rung
            "tune.search_space": "{optim.lr: {grid: [3.0e-2, 3.0e-2, 1.0e-7, 1.0e-7]}, latents.num_latents: {choice: [2, 4]}}"}
    base.update(extra)
    return tiny_overrides(backbone_cache, data_cache, tmp_path, **base)


@pytest.fixture
def ray_session():
    import ray

    yield ray
    ray.shutdown()


def test_sweep_asha_mlflow_best_config(ray_session, backbone_cache, data_cache, tmp_path):
    import ray

    from livr.train import train_worker
    from livr.tune import run_sweep

    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False, runtime_env={"env_vars": ENV})
    cfg = load_config(None, _sweep_args(backbone_cache, data_cache, tmp_path))
    summary = run_sweep(cfg)
    rows = summary["rows"]
    assert len(rows) == 4 and not summary["interrupted"]
    stopped = [r for r in rows if r["epochs"] < r["planned_epochs"]]
    assert stopped, rows  # ASHA stopped at least one trial before its last epoch (from Tune's results)
    assert all(r in stopped for r in rows if r["optim.lr"] == 1e-7)  # the useless lr never runs to the end
    assert summary["budget"]["trial_epochs_saved"] > 0
    # MLflow: one parent, 4 children with the searched params
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_id == summary["parent_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent_run_id"]]
    assert len(parent) == 1 and len(children) == 4
    assert {c.data.params["optim.lr"] for c in children} == {"0.03", "1e-07"}
    assert all(c.data.params["latents.num_latents"] in ("2", "4") for c in children)
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    # the best config reproduces a run with `livr train --config <best>`
    best = load_config(summary["best_config"])
    assert best.optim.lr == 3e-2
    ray.shutdown()
    best.name, best.train.stage1_steps, best.train.stage2_steps = "from-best", 1, 1
    assert train_worker(best)["global_step"] == 2


def test_sweep_with_two_workers_per_trial(ray_session, backbone_cache, data_cache, tmp_path):
    from livr.tune import run_sweep

    cfg = load_config(None, _sweep_args(backbone_cache, data_cache, tmp_path, **{
        "tune.workers_per_trial": 2, "tune.scheduler": "fifo", "train.stage1_epochs": 1, "train.stage2_epochs": 1,
        "tune.search_space": "{latents.num_latents: {grid: [2, 3]}}"}))
    summary = run_sweep(cfg)  # starts a local cluster sized for 1 trial driver + 2 workers
    assert len(summary["rows"]) == 2
    assert all(r["status"] == "completed" and r["epochs"] == 2 for r in summary["rows"]), summary["rows"]


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(backbone_cache, data_cache, tmp_path):
    args = _sweep_args(backbone_cache, data_cache, tmp_path, **{
        "tune.scheduler": "fifo", "tune.search_space": "{latents.num_latents: {grid: [2, 3]}}"})
    cmd = [sys.executable, "-m", "livr.cli", "tune", "--config", os.devnull, *args]
    env = {**os.environ, **ENV, "LIVR_TUNE_INTERRUPT_AFTER": "1"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 130, first.stdout[-2000:] + first.stderr[-2000:]  # stopped after 1 finished trial
    sweep = tmp_path / "runs" / "sweep"
    done = [d for d in sweep.iterdir() if d.name.startswith("trial_") and (d / "final_metrics.json").exists()]
    assert len(done) == 1
    mtime = (done[0] / "final_metrics.json").stat().st_mtime
    env.pop("LIVR_TUNE_INTERRUPT_AFTER")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resuming the sweep" in second.stdout
    trials = [d for d in sweep.iterdir() if d.name.startswith("trial_")]
    assert len(trials) == 2 and all((d / "final_metrics.json").exists() for d in trials)
    assert (done[0] / "final_metrics.json").stat().st_mtime == mtime, "the finished trial was not rerun"
    assert len((done[0] / "trial_starts.log").read_text().splitlines()) == 1


@pytest.mark.parametrize("space, message", [
    ("{optim.lrr: {grid: [1.0e-4]}}", "optim.lrr"),
    ("{latents.num_latents: {choice: []}}", "latents.num_latents"),
])
def test_bad_search_space_is_an_error_before_ray(space, message, backbone_cache, data_cache, tmp_path):
    import ray

    from livr.tune import run_sweep

    cfg = load_config(None, _sweep_args(backbone_cache, data_cache, tmp_path, **{"tune.search_space": space}))
    with pytest.raises(ConfigError, match=message):
        run_sweep(cfg)
    assert not ray.is_initialized()
