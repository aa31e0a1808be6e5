"""MLflow tracking: rank 0 only, one run per training run (stable id across restarts); it never stops training.

Default store: `sqlite:///<cwd>/mlflow.db` with artifacts in `<cwd>/mlartifacts` (set explicitly: with
sqlite MLflow would otherwise put them in ./mlruns). Any tracking URI (a real `mlflow server`) by config;
with an http(s) server the artifacts go where the server says (proxied through it with --serve-artifacts).

`preflight(cfg)` checks the URI in a few seconds before the model loads. Creating a run is the one synchronous
call; everything else (`log_params`, `log_metrics`, `log_run_dir`, `end`) goes through a background sender
(livr/tracking/outbox.py) that buffers to `<run_dir>/tracking_buffer.jsonl` while the server is unreachable and
replays it in order when it answers again, or at the next Tracker for the same run directory.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from functools import partial

from livr.config import Config, ConfigError, flatten, to_dict
from livr.tracking.outbox import is_permanent, outbox_for, reason, say

FLUSH_S = 30.0  # end(): how long to wait for buffered data to land (env LIVR_TRACKING_FLUSH_S overrides)
PREFLIGHT_S = 3.0  # preflight(): how long a tracking server has to answer
CREATE_S = 10.0  # how long creating the run keeps retrying a transient failure
# MLflow's own client retries a dead server for ~4 minutes (7 retries, backoff 2); the sender retries itself.
# Read by MLflow at every request; a value the user has set wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_READY: set[str] = set()  # sqlite stores this process has created/migrated under the lock


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or f"sqlite:///{os.path.abspath('mlflow.db')}"


def recorded_run_id(cfg: Config, run_dir: str, who: str) -> str | None:
    """The MLflow run id a run recorded (`<run_dir>/mlflow_run_id`), or None, with one line saying so, when tracking
    is off or the run has none (`who`: the command, for the line)."""
    id_file = os.path.join(run_dir, "mlflow_run_id")
    if not cfg.tracking.enabled or not os.path.exists(id_file):
        print(f"livr {who}: no MLflow record for {run_dir} (tracking disabled or no mlflow_run_id); files only")
        return None
    with open(id_file) as f:
        return f.read().strip()


def artifact_location(cfg: Config) -> str:
    """tracking.artifact_location; else "" for a tracking server (http/https: the server's default, e.g.
    proxied `mlflow-artifacts:/` under `mlflow server --serve-artifacts`); else <cwd>/mlartifacts."""
    if cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    if tracking_uri(cfg).startswith(("http://", "https://")):
        return ""
    return os.path.abspath("mlartifacts")


def experiment_id(client, cfg: Config) -> str:
    """The experiment's id, created if missing (another process creating it at the same moment is fine)."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg) or None)
    except Exception:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)  # lost the race: it exists now
        if exp is None:
            raise
        return exp.experiment_id


# ----------------------------------------------------------------------------- pre-flight and the sqlite store
def _sqlite_path(uri: str) -> str | None:
    """The database file of a sqlite:/// URI (None for other URIs and in-memory sqlite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return path if path and path != ":memory:" else None


def prepare_store(uri: str) -> None:
    """sqlite: create or migrate the store under a file lock next to the database, once per process, so runs
    launched together do not collide in MLflow's schema migration."""
    path = _sqlite_path(uri)
    if path is None or uri in _READY:
        return
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    with FileLock(os.path.abspath(path) + ".lock", timeout=300):
        MlflowClient(uri).search_experiments(max_results=1)
    _READY.add(uri)


def _fail(uri: str, why: str) -> None:
    raise ConfigError(f"config: tracking.uri={uri}: {why}")


def _check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PREFLIGHT_S):
            return
    except urllib.error.HTTPError as e:  # something answers, but not MLflow's /health
        _fail(uri, f"{uri.rstrip('/')}/health answers HTTP {e.code}, not an MLflow server's OK; check the URI, "
                   "or tracking.enabled=false")
    except (OSError, ValueError) as e:
        inner = getattr(e, "reason", e)
        why = f"{type(inner).__name__}: {inner}" if isinstance(inner, BaseException) else str(inner)
    _fail(uri, f"no MLflow server answers ({why}); start one (bash launch/mlflow_server.sh), or tracking.enabled=false")


def _check_sqlite(uri: str) -> None:
    path = _sqlite_path(uri)
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        _fail(uri, f"cannot create the directory {folder} ({e.strerror}); choose another tracking.uri")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK)):
        _fail(uri, f"{path if os.path.exists(path) else folder} is not writable; choose another tracking.uri")
    try:
        prepare_store(uri)
    except Exception as e:  # noqa: BLE001 - a broken database file, a lock that never frees
        _fail(uri, f"cannot open the MLflow store ({type(e).__name__}: {(str(e) or '-').splitlines()[0][:200]})")


def preflight(cfg: Config) -> None:
    """Before the model loads: a one-line ConfigError for a tracking URI that cannot work (an http(s) server that
    does not answer within PREFLIGHT_S, an unknown scheme, a sqlite path that cannot be written); a sqlite store
    is created here under its lock. A no-op with tracking.enabled=false."""
    if not cfg.tracking.enabled:
        return
    uri = tracking_uri(cfg)
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri)
    elif scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme.split("+")[0] in ("postgresql", "postgres", "mysql", "mssql") or uri.startswith("databricks"):
        return  # a database or Databricks: MLflow checks the connection when the run is created
    elif scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            _fail(uri, "MLflow 3.17 refuses a plain directory (file) store; use sqlite:///<path> or a server")
    else:
        _fail(uri, f"unknown scheme '{scheme}' (use http(s)://host:port, sqlite:///<path>, postgresql://, mysql://, "
                   "mssql:// or databricks)")


# ----------------------------------------------------------------------------- the tracker
def _send(client, ops: list) -> None:
    """Send ops of one kind to MLflow (consecutive metric ops arrive together, as one log_batch)."""
    from mlflow.entities import Metric, Param

    kind, run = ops[0]["op"], ops[0]["run"]
    if kind == "metrics":
        client.log_batch(run, metrics=[Metric(k, v, ts, step) for op in ops for k, v, ts, step in op["m"]])
    elif kind == "params":
        client.log_batch(run, params=[Param(k, v) for k, v in ops[0]["p"]])
    elif kind == "artifact":
        path = ops[0]["path"]
        (client.log_artifacts if os.path.isdir(path) else client.log_artifact)(run, path, ops[0]["to"])
    elif kind == "status":
        client.set_terminated(run, status=ops[0]["status"], end_time=ops[0]["t"])
    elif kind == "running":
        client.update_run(run, status="RUNNING")


def _flush_s() -> float:
    try:
        return float(os.environ.get("LIVR_TRACKING_FLUSH_S", FLUSH_S))
    except ValueError:
        return FLUSH_S


def _create_run(client, cfg: Config, uri: str, tags: dict) -> str:
    deadline = time.monotonic() + CREATE_S
    while True:
        try:
            return client.create_run(experiment_id(client, cfg), run_name=cfg.tracking.run_name or cfg.name,
                                     tags=tags).info.run_id
        except Exception as e:  # one line for the user, whatever MLflow raised
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if is_permanent(e):
                raise ConfigError(f"config: tracking.experiment={cfg.tracking.experiment}: MLflow refused the run "
                                  f"({first})") from e
            if time.monotonic() > deadline:
                raise ConfigError(f"config: tracking.uri={uri}: no MLflow server answers ({reason(e)}); start one, "
                                  "or tracking.enabled=false") from e
            time.sleep(1.0)


class Tracker:
    """MLflow logging that never blocks training on the network; a no-op on ranks other than 0 or when tracking is
    disabled. `run_id` (or `<run_dir>/mlflow_run_id`) continues an existing run and replays what an earlier
    process left in `<run_dir>/tracking_buffer.jsonl`."""

    def __init__(self, cfg: Config, rank: int, run_dir: str, parent_run_id: str | None = None,
                 run_id: str | None = None):
        self.active = rank == 0 and cfg.tracking.enabled
        self.run_id, self.ended = None, False
        if not self.active:
            return
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg)
        prepare_store(self.uri)
        self.client = MlflowClient(self.uri)
        self.outbox = outbox_for(run_dir, partial(_send, self.client), self.uri)
        self._steps_file = os.path.join(run_dir, "tracking_steps.json")
        self._steps = _read_json(self._steps_file)  # per metric key, the last step logged (see log_metrics)
        id_file = os.path.join(run_dir, "mlflow_run_id")
        if run_id is None and os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        self.monitor = None
        if run_id:  # a restart or resume continues the same MLflow run (id from the checkpoint or run dir)
            self.run_id = run_id
            self.outbox.put({"op": "running", "run": run_id})
            self._system_metrics(cfg, resumed=True)
            return
        tags = {"backbone": cfg.model.backbone, "mode": cfg.train.mode, "tasks": ",".join(cfg.data.tasks),
                "num_latents": str(cfg.latents.num_latents), "livr.run_dir": os.path.abspath(run_dir)}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = _create_run(self.client, cfg, self.uri, tags)
        os.makedirs(run_dir, exist_ok=True)
        with open(id_file + ".tmp", "w") as f:
            f.write(self.run_id)
        os.replace(id_file + ".tmp", id_file)
        self.log_params(flatten(to_dict(cfg)))
        self._system_metrics(cfg, resumed=False)

    def _system_metrics(self, cfg: Config, resumed: bool) -> None:
        """`tracking.system_metrics`: MLflow's own monitor (a thread sampling psutil, and the GPUs through pynvml
        when nvidia-ml-py is installed) logs system/* metrics of rank 0's machine straight to the store, every
        `system_metrics_interval_s`; a resumed run continues its steps. Best effort: an unreachable store stops
        the monitor, never the training (the outbox keeps only livr's own metrics)."""
        if not cfg.tracking.system_metrics:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=cfg.tracking.system_metrics_interval_s,
                                                resume_logging=resumed, tracking_uri=self.uri)
            self.monitor.start()
        except Exception as e:  # noqa: BLE001 - system metrics must not stop a run
            say(f"tracking.system_metrics: MLflow's monitor did not start ({type(e).__name__}: {str(e)[:200]})")
            self.monitor = None

    def log_params(self, params: dict) -> None:
        if not self.active or self.ended:
            return
        items = [[k, str(v)[:6000]] for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's log_batch takes 100 params at most
            self.outbox.put({"op": "params", "run": self.run_id, "p": items[i : i + 100]})

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Queue the metrics (timestamped now); returns at once, whatever the server's state."""
        if not self.active or self.ended or not metrics:
            return
        # a run resumed from a checkpoint re-runs the steps logged after it (bit-identically): logged once only
        metrics = {k: v for k, v in metrics.items() if int(step) > self._steps.get(k, -1)}
        if not metrics:
            return
        ts = int(time.time() * 1000)
        self.outbox.put({"op": "metrics", "run": self.run_id, "m": [[k, float(v), ts, int(step)] for k, v in metrics.items()]})
        self._steps.update(dict.fromkeys(metrics, int(step)))
        _write_json(self._steps_file, self._steps)

    def forget_logged_steps(self) -> None:
        """A run that starts again from step 0 (train.resume=false) logs every step again."""
        if self.active:
            self._steps = {}
            _write_json(self._steps_file, self._steps)

    def log_run_dir(self, run_dir: str) -> None:
        """The adapter directory, latents, tokenizer, config and evaluation table as artifacts (queued; sent by the
        end of `end()` or at the next resume)."""
        if not self.active or self.ended:
            return
        for name in ("adapter", "tokenizer"):
            path = os.path.join(run_dir, name)
            if os.path.isdir(path):
                self.outbox.put({"op": "artifact", "run": self.run_id, "path": os.path.abspath(path), "to": name})
        for name in ("config.yaml", "latents.safetensors", "vocab.json", "eval.json", "eval.md", "eval_zero_shot.json"):
            path = os.path.join(run_dir, name)
            if os.path.exists(path):
                self.outbox.put({"op": "artifact", "run": self.run_id, "path": os.path.abspath(path), "to": None})

    def end(self, status: str = "FINISHED") -> None:
        """Queue the terminal status ("FINISHED" | "FAILED" | "KILLED"), wait up to LIVR_TRACKING_FLUSH_S (30 s) for
        everything to land, and leave the rest in the buffer file for the next resume. Idempotent; never raises."""
        if not self.active or self.ended:
            return
        self.ended = True
        try:
            if self.monitor is not None:  # its last samples, before the run stops being RUNNING
                self.monitor.finish()
            self.outbox.put({"op": "status", "run": self.run_id, "status": status, "t": int(time.time() * 1000)})
            left = self.outbox.close(_flush_s())
            if left:
                say(f"{self.uri} unreachable; {left} unsent items (metrics, artifacts, the {status} status) kept in "
                     f"{self.outbox.path}: they are sent when this run resumes")
        except Exception as e:  # noqa: BLE001 - the end of a run must not fail because of tracking
            say(f"could not finish the MLflow run ({type(e).__name__}: {str(e)[:200]})")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)
