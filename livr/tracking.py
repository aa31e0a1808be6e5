"""MLflow tracking: rank 0 only, one run per training run (stable id across restarts).

Default store: `sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlartifacts` (set explicitly: with
sqlite MLflow would otherwise put them in ./mlruns). Any tracking URI (a real `mlflow server`) by config;
with an http(s) server the artifacts go where the server says (proxied through it with --serve-artifacts).
"""
from __future__ import annotations

import os

from livr.config import Config, flatten, to_dict


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or f"sqlite:///{os.path.abspath('mlflow.db')}"


def artifact_location(cfg: Config) -> str:
    """tracking.artifact_location; else "" for a tracking server (http/https: the server's default, e.g.
    proxied `mlflow-artifacts:/` under `mlflow server --serve-artifacts`); else <cwd>/mlartifacts."""
    if cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    if tracking_uri(cfg).startswith(("http://", "https://")):
        return ""
    return os.path.abspath("mlartifacts")


def experiment_id(client, cfg: Config) -> str:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg) or None)


class Tracker:
    """Thin MLflow wrapper; a no-op on ranks other than 0 or when tracking is disabled."""

    def __init__(self, cfg: Config, rank: int, run_dir: str, parent_run_id: str | None = None,
                 run_id: str | None = None):
        self.active = rank == 0 and cfg.tracking.enabled
        self.run_id = None
        if not self.active:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri(cfg))
        id_file = os.path.join(run_dir, "mlflow_run_id")
        if run_id is None and os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        if run_id:  # a restart or resume continues the same MLflow run (id from the checkpoint or run dir)
            self.run_id = run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {"backbone": cfg.model.backbone, "mode": cfg.train.mode, "tasks": ",".join(cfg.data.tasks),
                "num_latents": str(cfg.latents.num_latents), "livr.run_dir": os.path.abspath(run_dir)}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id(self.client, cfg), run_name=cfg.tracking.run_name or cfg.name, tags=tags)
        self.run_id = run.info.run_id
        os.makedirs(run_dir, exist_ok=True)
        with open(id_file + ".tmp", "w") as f:
            f.write(self.run_id)
        os.replace(id_file + ".tmp", id_file)
        self.log_params({k: v for k, v in flatten(to_dict(cfg)).items()})

    def log_params(self, params: dict) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        if not self.active or not metrics:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_run_dir(self, run_dir: str) -> None:
        """The adapter directory, latents, tokenizer, config and evaluation table as artifacts."""
        if not self.active:
            return
        for name in ("adapter", "tokenizer"):
            path = os.path.join(run_dir, name)
            if os.path.isdir(path):
                self.client.log_artifacts(self.run_id, path, artifact_path=name)
        for name in ("config.yaml", "latents.safetensors", "vocab.json", "eval.json", "eval.md", "eval_zero_shot.json"):
            path = os.path.join(run_dir, name)
            if os.path.exists(path):
                self.client.log_artifact(self.run_id, path)

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self.client.set_terminated(self.run_id, status=status)
