"""Hyperparameter search with Ray Tune over the one training function (`livr tune`).

    cfg = load_config("configs/demo.yaml", ["tune.num_samples=2"])
    summary = run_sweep(cfg)        # results table, plot, best_config.yaml, MLflow parent + children

The search space is `tune.search_space`: dotted config keys -> one of `{"grid": [...]}`, `{"choice": [...]}`,
`{"loguniform": [lo, hi]}`, `{"uniform": [lo, hi]}`, `{"randint": [lo, hi]}` (both ends included). Several
keys searched together (e.g. the Stage-1/Stage-2 split) are one comma-separated key whose grid/choice
values are lists: `"train.stage1_epochs,train.stage2_epochs": {"choice": [[4, 6], [2, 8]]}`.
Everything is validated before Ray starts (`ConfigError` naming the key).

Each trial is `train_worker(trial_cfg)`: in the trial's own process (`tune.workers_per_trial=0`) or as a
TorchTrainer of N Ray Train workers (`livr.cluster.ray_train.make_trainer`, Train V2 pattern). A trial reports
once per epoch (`val_accuracy`, `global_step`, ...), so ASHA's time unit is epochs. The sweep lives in
`<output_dir>/<name>/`: one run directory per trial (`trial_<id>/`, which train_worker resumes), Tune's
own state, `results.md|csv`, `accuracy_vs_K.png`, `best_config.yaml`. The same command resumes an
interrupted sweep (finished trials are not rerun). The trial body and Tune callbacks are in
`livr/cluster/tune_trial.py`; the search space in `livr/cluster/search_space.py`; the results table, plot, best config and MLflow parent artifacts in `livr/cluster/sweep_report.py`.
"""
from __future__ import annotations

import copy
import os
import posixpath
import sys
import time

from ray import tune

from livr.cluster import tune_trust
from livr.cluster.search_space import Dim, expected_trials, param_space, parse_space
from livr.config import Config, ConfigError, save_config, to_dict
from livr.training.runlock import ray_safe_name


def check_tune(cfg: Config) -> list[Dim]:
    """Everything a user can get wrong in a sweep, before Ray starts."""
    t = cfg.tune
    for key, low in (("num_samples", 1), ("max_concurrent_trials", 0), ("workers_per_trial", 0), ("grace_period", 1)):
        if getattr(t, key) < low:
            raise ConfigError(f"config: tune.{key}={getattr(t, key)!r}: must be >= {low}")
    if t.reduction_factor <= 1:
        raise ConfigError(f"config: tune.reduction_factor={t.reduction_factor!r}: must be > 1")
    if not t.metric:
        raise ConfigError("config: tune.metric='': name the reported metric to optimise (e.g. val_accuracy)")
    if t.searcher == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("config: tune.searcher='optuna' needs optuna (pip install optuna), "
                              "or use tune.searcher=random") from None
    dims = parse_space(cfg)
    if t.workers_per_trial > 0:
        from livr.cluster.ray_train import check_config

        trial = copy.deepcopy(cfg)
        trial.distributed.num_workers = t.workers_per_trial
        check_config(trial)
    return dims


# ----------------------------------------------------------------------------- the driver
def init_ray_for_sweep(cfg: Config) -> None:
    """An existing cluster (distributed.address / RAY_ADDRESS) or a local one sized for the trials."""
    import ray

    if ray.is_initialized():
        return
    from livr.cluster.ray_train import _WORKER_ENV, init_ray
    from livr.utils.console import WORKER_SETUP

    if cfg.distributed.address or os.environ.get("RAY_ADDRESS"):
        return init_ray(cfg)
    t, d = cfg.tune, cfg.distributed
    per_trial = 1 + t.workers_per_trial * d.cpus_per_worker if t.workers_per_trial else d.cpus_per_worker
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # a worker's print once (the patch tees it to a logger too)
    ray.init(num_cpus=max(os.cpu_count() or 1, per_trial * max(1, t.max_concurrent_trials)),
             object_store_memory=100 * 1024**2, include_dashboard=bool(t.workers_per_trial),
             runtime_env={"env_vars": env, "worker_process_setup_hook": WORKER_SETUP}, log_to_driver=True)


def check_capacity(cfg: Config) -> None:
    """A trial larger than the whole cluster is a clear error, not a trial pending for ever."""
    import ray

    t, d = cfg.tune, cfg.distributed
    need = 1 + t.workers_per_trial * d.cpus_per_worker if t.workers_per_trial else d.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise ConfigError(f"config: tune.workers_per_trial={t.workers_per_trial}: a trial needs {need} CPUs "
                          f"(1 for the trial driver + workers x distributed.cpus_per_worker) but the cluster has {have:g}")


def run_sweep(cfg: Config) -> dict:
    """Run (or resume) the sweep; print and write the results; return a summary dict."""
    from livr.cluster.ray_train import absolute_paths, check_storage
    from livr.tracking.tracker import Tracker, tracking_uri

    dims = check_tune(cfg)  # before Ray starts
    cfg = absolute_paths(copy.deepcopy(cfg))  # trials run in Ray's working directories
    sweep_dir = cfg.run_dir
    storage = cfg.distributed.storage_path or cfg.output_dir
    ray_name = ray_safe_name(cfg.name)  # Ray's experiment and trial paths: ASCII (the sweep dir keeps the name)
    exp_path = posixpath.join(storage, ray_name) if "://" in storage else os.path.join(storage, ray_name)
    saved = os.path.join(sweep_dir, "sweep_config.yaml")
    if os.path.exists(saved):
        from livr.config import load_config

        if to_dict(load_config(saved)) != to_dict(cfg):
            raise ConfigError(f"config: a sweep named '{cfg.name}' with a different config exists in {sweep_dir}: "
                              "re-run it with the same config to resume, or choose a new name=")
    save_config(cfg, saved)
    tune_trust.verify(exp_path)  # before Ray starts and Tune unpickles anything from the sweep's storage

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # a trial that just finished is not rerun after a kill
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # forced by num_to_keep: wanted
    import ray

    started_ray = not ray.is_initialized()
    init_ray_for_sweep(cfg)
    check_capacity(cfg)
    check_storage(cfg)
    t0 = time.time()
    parent = Tracker(cfg, 0, sweep_dir)
    if parent.active:
        parent.client.set_tag(parent.run_id, "livr.sweep", "true")
        for d in dims:  # the parent's config tags name the base values: mark the searched ones
            for k in d.keys:
                if k == "latents.num_latents":
                    parent.client.set_tag(parent.run_id, "num_latents", "searched")
    t, d = cfg.tune, cfg.distributed
    resources = {"cpu": d.cpus_per_worker}
    if d.use_gpu:
        resources["gpu"] = d.gpus_per_worker or 1
    setup = {"base": to_dict(cfg), "sweep_dir": sweep_dir, "sweep_name": cfg.name, "parent_run_id": parent.run_id,
             "workers": t.workers_per_trial, "metric": t.metric, "resources": resources,
             "train_storage": posixpath.join(exp_path, "train") if "://" in exp_path else os.path.join(exp_path, "train")}
    from livr.cluster.tune_trial import RunStatus, make_trainable

    trainable = make_trainable(setup)
    tune_trust.SIGNERS.clear()
    if tune.Tuner.can_restore(exp_path):
        print(f"[livr tune] resuming the sweep in {exp_path} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        signer = next(iter(tune_trust.SIGNERS.values()), None) or tune_trust.Signer(exp_path)
        signer.exp_path = exp_path  # (the restored callback may name the directory's old place)
    else:
        signer = tune_trust.Signer(exp_path)
        scheduler = None
        if t.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=10**6, grace_period=t.grace_period,
                                      reduction_factor=t.reduction_factor)
        search_alg = None
        if t.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=cfg.train.seed)
        tuner = tune.Tuner(
            trainable, param_space=param_space(dims, t.searcher),
            tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, scheduler=scheduler, search_alg=search_alg,
                                        num_samples=t.num_samples, max_concurrent_trials=t.max_concurrent_trials or None),
            run_config=tune.RunConfig(name=ray_name, storage_path=storage, verbose=1,
                                      callbacks=[RunStatus(sweep_dir, tracking_uri(cfg)), signer],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      failure_config=tune.FailureConfig(max_failures=d.max_failures)))
        signer.sign_storage("tuner.pkl")  # Tune wrote it straight to the storage, just now
    grid = tuner.fit()
    signer.sign()  # the final state (also after SIGINT: Tune saves it before fit() returns)
    if started_ray:  # the trials' last log lines reach the console now, not after the summary (which is printed last)
        ray.shutdown()
    from livr.cluster.sweep_report import summarise

    summary = summarise(cfg, dims, grid, expected_trials(cfg, dims), parent, time.time() - t0)
    return summary


def main_tune(cfg: Config) -> int:
    summary = run_sweep(cfg)
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":  # pragma: no cover
    from livr.config import load_config

    sys.exit(main_tune(load_config(sys.argv[1], sys.argv[2:])))
