"""`livr tune`: Ray Tune over train_worker on a tiny backbone — ASHA, MLflow parent/children, best config,
Tune over Ray Train (2 workers per trial), resume after an interrupted driver, errors before Ray starts.

Real Ray (one small local cluster for the module, shut down even on failure), real MLflow (sqlite). The
ASHA sweep optimises the epoch's training loss (tune.metric=train_loss, mode=min): a useful lr lowers it
within the first epoch while lr=1e-8 cannot, so ASHA has something to stop, deterministically.
"""
import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_overrides

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test clusters only
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("LIVR_TUNE_SECRET", "livr-test-key")  # sweeps' signing key (never the user's key file)

from livr.config import ConfigError, load_config, to_dict

# the sweep's base: 2-way Visual_Similarity, 32 training rows (8 steps of 4 per epoch), scored on 1 token
BASE = {"data.tasks": "[Visual_Similarity]", "data.train_size": 32, "data.val_size": 8, "eval.splits": "[val]",
        "eval.max_new_tokens": 1, "optim.warmup_ratio": 0, "train.stage1_epochs": 2, "train.stage2_epochs": 2}


def _overrides(backbone_cache, data_cache, tmp_path, space: dict, **extra):
    return tiny_overrides(backbone_cache, data_cache, tmp_path, **{**BASE, "tune.search_space": json.dumps(space), **extra})


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("livr")
    return client, client.search_runs([exp.experiment_id])


def test_bad_search_space_is_an_error_before_ray_starts(tmp_path, capsys):
    import ray

    from livr.cli import main
    from livr.cluster.tune import run_sweep

    if ray.is_initialized():
        ray.shutdown()
    base = tiny_overrides("/nonexistent", "/nonexistent", tmp_path)
    cases = [({"latents.num_latnets": {"grid": [2, 4]}}, r"\['latents.num_latnets'\].*not a config key"),
             ({"optim.lr": {"choice": []}}, r"\['optim.lr'\]: choice needs a non-empty list"),
             ({"optim.lr": {"loguniform": [0, 1e-3]}}, r"\['optim.lr'\]: loguniform needs lo > 0"),
             ({"optim.lr": {"normal": [0, 1]}}, r"\['optim.lr'\]: must be one of"),
             ({"latents.num_latents": {"grid": [4, -1]}}, r"\['latents.num_latents'\]: latents.num_latents=-1"),
             ({"tune.num_samples": {"grid": [1, 2]}}, r"'tune.num_samples' cannot be searched"),
             ({"train.stage1_epochs,train.stage2_epochs": {"choice": [[4, 6], [2]]}}, r"list of 2 values")]
    for space, match in cases:
        cfg = load_config(None, [*base, f"tune.search_space={json.dumps(space)}"])
        with pytest.raises(ConfigError, match=match):
            run_sweep(cfg)
    # the CLI prints one line naming the key and exits 2
    (tmp_path / "c.yaml").write_text("name: bad\n")
    assert main(["tune", "--config", str(tmp_path / "c.yaml"), *base,
                 'tune.search_space={"lora.rank": {"grid": [4, 8]}}']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.rank" in err[0] and "not a config key" in err[0]
    try:
        import optuna  # noqa: F401
    except ImportError:
        cfg = load_config(None, [*base, "tune.searcher=optuna"])
        with pytest.raises(ConfigError, match="needs optuna"):
            run_sweep(cfg)
    assert ray.is_initialized() is False
    assert not (tmp_path / "runs").exists()


def test_search_space_parsing_and_multi_key_values(tmp_path):
    from livr.cluster.search_space import apply_params, expected_trials, parse_space, trial_config

    space = {"latents.num_latents": {"grid": [4, 8, 16, 32]}, "optim.lr": {"loguniform": [1e-5, 5e-4]},
             "train.stage1_epochs,train.stage2_epochs": {"choice": [[4, 6], [2, 8]]}, "lora.r": {"randint": [4, 16]}}
    cfg = load_config(None, [f"tune.search_space={json.dumps(space)}", "tune.num_samples=3"])
    dims = parse_space(cfg)
    assert [d.kind for d in dims] == ["grid", "loguniform", "choice", "randint"]
    assert expected_trials(cfg, dims) == 12
    import numpy as np

    d = apply_params(to_dict(cfg),
                     {"latents.num_latents": 8, "lora.r": np.int64(5), "train.stage1_epochs,train.stage2_epochs": "[2, 8]"})
    assert d["lora"]["r"] == 5 and type(d["lora"]["r"]) is int
    assert (d["train"]["stage1_epochs"], d["train"]["stage2_epochs"]) == (2, 8)
    setup = {"base": d, "sweep_dir": str(tmp_path), "sweep_name": "s", "workers": 0}
    tc = trial_config(setup, {"optim.lr": 3e-4}, "abc12_00001")
    assert tc.run_dir == os.path.join(str(tmp_path), "trial_abc12_00001") and tc.optim.lr == 3e-4
    # the default space: K over {4, 8, 16, 32} and lr log-uniform in [1e-5, 5e-4]
    default = parse_space(load_config(None, []))
    assert [(d.key, d.kind, d.values) for d in default] == [("latents.num_latents", "grid", [4, 8, 16, 32]),
                                                           ("optim.lr", "loguniform", [1e-5, 5e-4])]


@pytest.fixture(scope="module")
def ray_cluster():
    """One small local cluster for the module (3 logical CPUs: a Train trial is 1 driver CPU + 2 workers);
    the dashboard is on because Tune over Ray Train needs it to release a finished trial's placement group."""
    import ray

    from livr.cluster.ray_train import _WORKER_ENV

    if ray.is_initialized():
        ray.shutdown()
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    ray.init(num_cpus=3, object_store_memory=100 * 1024**2, include_dashboard=True, runtime_env={"env_vars": env})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_asha_sweep_mlflow_best_config(ray_cluster, backbone_cache, data_cache, tmp_path):
    from livr.cli import main
    from livr.cluster.tune import run_sweep

    # lr first: the grid runs both useful-lr trials first, so the lr=1e-8 ones meet a populated rung
    space = {"optim.lr": {"grid": [1e-2, 1e-8]}, "latents.num_latents": {"grid": [2, 4]}}
    cfg = load_config(None, _overrides(backbone_cache, data_cache, tmp_path, space, name="asha",
                                       **{"tune.max_concurrent_trials": 2, "tune.grace_period": 1,
                                          "tune.reduction_factor": 2, "tune.metric": "train_loss",
                                          "tune.mode": "min"}))
    s = run_sweep(cfg)
    rows = s["rows"]
    assert not s["interrupted"] and len(rows) == 4
    # ASHA stopped trials early: fewer reported iterations (epochs) than the trial's plan of 4
    assert all(r["planned_epochs"] == 4 and r["planned_steps"] == 32 for r in rows)
    stopped = [r for r in rows if r["epochs"] < r["planned_epochs"]]
    assert stopped and all(r["status"] == "stopped early" for r in stopped)
    assert any(r["status"] == "completed" and r["epochs"] == 4 for r in rows)
    assert all(r["status"] == "completed" for r in rows if r["epochs"] == r["planned_epochs"])  # never stopped at its end
    assert all(r["status"] == "stopped early" for r in rows if r["optim.lr"] == 1e-8)  # never runs to the end
    assert max(r["best"] for r in rows if r["optim.lr"] == 1e-2) < min(r["best"] for r in rows if r["optim.lr"] == 1e-8)
    b = s["budget"]
    assert b["trial_epochs_full"] == 16 and b["trial_epochs_saved"] == 16 - sum(r["epochs"] for r in rows) > 0

    # the best trial, its config, the table and the plot
    best = s["best"]
    assert best["status"] == "completed" and best["optim.lr"] == 1e-2
    assert best["best"] == min(r["best"] for r in rows if r["status"] == "completed")
    for key in ("results_md", "results_csv", "plot"):
        assert os.path.getsize(s[key]) > 0
    with open(s["results_md"]) as f:
        assert "| optim.lr | latents.num_latents | best train_loss |" in f.read()
    bc = load_config(s["best_config"])
    assert (bc.optim.lr, bc.latents.num_latents, bc.name) == (1e-2, best["latents.num_latents"], "asha-best")

    # MLflow: one parent, four children with their K and lr, none left RUNNING
    client, runs = _mlflow_runs(cfg.tracking.uri)
    parents = [r for r in runs if r.data.tags.get("livr.sweep") == "true"]
    assert len(parents) == 1 and parents[0].info.run_id == s["parent_run_id"]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert sorted((float(c.data.params["optim.lr"]), int(c.data.params["latents.num_latents"])) for c in children) == \
        [(1e-8, 2), (1e-8, 4), (1e-2, 2), (1e-2, 4)]
    by_trial = {c.data.params["name"].removeprefix("trial_"): c for c in children}
    for r in rows:
        c = by_trial[r["trial"]]
        assert c.info.status == ("FINISHED" if r["status"] == "completed" else "KILLED")
        assert (c.data.tags.get("livr.early_stopped") == "true") == (r["status"] != "completed"), c.data.tags
        curve = client.get_metric_history(c.info.run_id, "train_loss")
        assert len(curve) == r["epochs"]  # logged as it went, also for a stopped trial
        assert len(client.get_metric_history(c.info.run_id, "stage1/val_accuracy")) >= 1
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tune.max_concurrent_trials"] == "2"
    assert parent.data.metrics["trial_epochs_saved"] == b["trial_epochs_saved"]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.csv", "accuracy_vs_K.png", "best_config.yaml", "best_trial"} <= arts
    assert "best_trial/adapter/adapter_model.safetensors" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "best_trial/adapter")}

    # the same command again: the finished sweep is restored, nothing is rerun
    def starts():
        return {r["trial"]: _read(os.path.join(r["run_dir"], "trial_starts.log")) for r in rows}

    before = starts()
    again = run_sweep(cfg)
    assert sorted(r["trial"] for r in again["rows"]) == sorted(before) and starts() == before

    # `livr train --config best_config.yaml` trains it (a few steps)
    assert main(["train", "--config", s["best_config"], "train.stage1_steps=1", "train.stage2_steps=1"]) == 0
    assert os.path.exists(os.path.join(bc.run_dir, "adapter", "adapter_model.safetensors"))


class _Payload:
    """A pickle that creates `path` when unpickled (os.mkdir runs at load time)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.slow
def test_resume_after_interrupt_keeps_finished_trials(ray_cluster, backbone_cache, data_cache, tmp_path, monkeypatch):
    """The driver (the real CLI, in a subprocess) is stopped (SIGINT) while its second trial has written its
    first epoch's checkpoint but Tune holds no result of it; a planted pickle in Tune's state is refused; the
    same command again finishes the sweep without rerunning the finished trial, and the resumed trial reports
    its true epoch count (2 of 2, not Tune's restarted 1)."""
    import pickle
    import stat

    from livr.cluster import tune_trust

    space = {"latents.num_latents": {"grid": [2, 4, 8]}}
    ov = _overrides(backbone_cache, data_cache, tmp_path, space, name="resume",
                    **{"tune.max_concurrent_trials": 1, "tune.scheduler": "fifo", "train.stage1_epochs": 1,
                       "train.stage2_epochs": 1, "data.train_size": 16})  # 4 steps an epoch
    (tmp_path / "sweep.yaml").write_text("name: resume\n")
    cmd = [sys.executable, "-m", "livr.cli", "tune", "--config", str(tmp_path / "sweep.yaml"), *ov]
    xdg = tmp_path / "xdg"  # the signing key lives here, outside the sweep's storage
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "XDG_CONFIG_HOME": str(xdg), "LIVR_TUNE_INTERRUPT_AT_REPORT": "3"}
    env.pop("LIVR_TUNE_SECRET", None)
    first = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    assert first.returncode == 130, first.stdout[-3000:] + first.stderr[-3000:]
    assert "interrupted: run the same command again" in first.stdout
    sweep = tmp_path / "runs" / "resume"
    done = [d for d in os.listdir(sweep) if d.startswith("trial_") and (sweep / d / "final_metrics.json").exists()]
    assert len(done) == 1
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, runs = _mlflow_runs(uri)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the interrupted ones are closed (KILLED)

    # Tune's pickled state is signed with a key outside the storage; a planted pickle is refused unread
    key = xdg / "livr" / "tune_secret"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and (sweep / "livr_trust.json").exists()
    marker = tmp_path / "payload-ran"
    original = (sweep / "tuner.pkl").read_bytes()
    (sweep / "tuner.pkl").write_bytes(pickle.dumps(_Payload(str(marker))))
    env.pop("LIVR_TUNE_INTERRUPT_AT_REPORT")
    refused = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len([e for e in err if e.startswith("livr: error:")]) == 1, refused.stderr[-3000:]
    assert f"{sweep}/tuner.pkl is not signed by this machine's livr key" in err[-1], err[-1]
    assert not marker.exists()
    (sweep / "tuner.pkl").write_bytes(original)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("LIVR_TUNE_SECRET", raising=False)
    tune_trust.verify(str(sweep))  # as signed
    newer = sweep / "experiment_state-2999-01-01_00-00-00.json"  # Tune would load the newest: an added one too
    newer.write_text("{}")
    with pytest.raises(ConfigError, match="experiment_state-2999.* is not signed"):
        tune_trust.verify(str(sweep))
    newer.unlink()

    second = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the sweep" in second.stdout and "best config:" in second.stdout
    assert not marker.exists()
    trials = sorted(d for d in os.listdir(sweep) if d.startswith("trial_"))
    assert len(trials) == 3 and all((sweep / d / "final_metrics.json").exists() for d in trials)
    tune_trust.verify(str(sweep))  # the resumed session's state is signed too (a third run would resume)
    with open(sweep / done[0] / "trial_starts.log") as f:
        assert len(f.read().splitlines()) == 1  # the finished trial was not started again
    resumed = [d for d in trials if len(_read(str(sweep / d / "trial_starts.log")).splitlines()) == 2]
    assert len(resumed) == 1  # the interrupted one
    with open(sweep / resumed[0] / "final_metrics.json") as f:
        assert json.load(f)["resumed_from"] == [4]  # from its own checkpoint after epoch 1, Tune knowing nothing
    import csv

    with open(sweep / "results.csv") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert len(rows) == 3
    for r in rows.values():  # the resumed trial too: 2 of 2 epochs (not Tune's restarted count), 8 of 8 steps
        assert (r["epochs"], r["planned_epochs"], r["steps"], r["planned_steps"], r["status"]) == \
            ("2", "2", "8", "8", "completed"), r
    client, runs = _mlflow_runs(uri)
    parent = [r for r in runs if r.data.tags.get("livr.sweep") == "true"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    first_child = next(c for c in children if c.data.params["name"] == done[0])
    assert len(client.get_metric_history(first_child.info.run_id, "stage2/val_accuracy")) == 1


@pytest.mark.slow
def test_tune_over_ray_train_two_workers_per_trial(ray_cluster, backbone_cache, data_cache, tmp_path):
    from livr.cluster.tune import run_sweep

    space = {"latents.num_latents": {"grid": [2, 4]}}
    cfg = load_config(None, _overrides(backbone_cache, data_cache, tmp_path, space, name="train2",
                                       **{"tune.workers_per_trial": 2, "tune.max_concurrent_trials": 1,
                                          "tune.scheduler": "fifo", "train.stage1_epochs": 1,
                                          "train.stage2_epochs": 1}))
    s = run_sweep(cfg)
    rows = s["rows"]
    # both trials ran to the end: the first trial's placement group was released for the second
    assert len(rows) == 2 and all(r["status"] == "completed" and r["epochs"] == 2 for r in rows)
    assert all(r["planned_steps"] == 8 for r in rows)  # 32 rows / (4 per worker x 2 workers) = 4 steps/epoch
    for r in rows:
        assert os.path.exists(os.path.join(r["run_dir"], "adapter", "adapter_model.safetensors"))
    _, runs = _mlflow_runs(cfg.tracking.uri)
    parent = next(r for r in runs if r.data.tags.get("livr.sweep") == "true")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.params["distributed.num_workers"] == "2" for c in children)
