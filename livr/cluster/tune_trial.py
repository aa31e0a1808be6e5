"""The Ray side of `livr tune`: the trial body (train_worker in the trial's process, or a TorchTrainer of N
workers), the per-epoch report plumbing, and the driver callback that closes the trials' MLflow runs."""
from __future__ import annotations

import json
import os
import signal
import time

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from livr.cluster.search_space import trial_config


def run_trial(params: dict, setup: dict) -> None:
    """The trial body: a child MLflow run, then train_worker in-process or on N Ray Train workers."""
    from livr.tracking.tracker import Tracker

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup, params, trial_id)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "trial_starts.log"), "a") as f:  # one line per (re)start
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {json.dumps(params, default=str)}\n")
    Tracker(cfg, 0, cfg.run_dir, parent_run_id=setup["parent_run_id"])  # the child run (or the existing one)
    metric = setup["metric"]
    if setup["workers"] == 0:
        from livr.training.train import train_worker

        held, sent = [], []
        held_file = os.path.join(cfg.run_dir, "tune_last_report.json")

        def report(metrics: dict, checkpoint_dir: str | None) -> None:
            if metric not in metrics:  # step checkpoints between epochs: train_worker keeps them itself
                return
            _interrupt_hook(setup["sweep_dir"])
            if _is_last(metrics):  # held until the run is written: ASHA stopping it now would lose the adapter
                held.append((metrics, checkpoint_dir))
                _write_json(held_file, metrics)  # a driver stopped before it was sent: sent on resume
                return
            sent.append(metrics)
            _report(metrics, checkpoint_dir)

        last = os.path.join(cfg.run_dir, "checkpoints", "last")
        ckpt = tune.get_checkpoint()
        if ckpt is not None and not os.path.exists(last):  # restored on a node without the trial's run dir
            with ckpt.as_directory() as path:
                train_worker(cfg, report=report, resume_from=path)
        else:
            train_worker(cfg, report=report)
        if not held and not sent and os.path.exists(held_file):  # trained to the end before: its last report
            with open(held_file) as f:
                held.append((json.load(f), last))
        for metrics, checkpoint_dir in held:
            _report(metrics, checkpoint_dir)
    else:
        from livr.cluster.ray_train import make_trainer

        result = make_trainer(cfg, name=f"trial_{trial_id}", storage_path=setup["train_storage"],
                              callbacks=[EpochReportCallback(metric)]).fit()
        if result.metrics and metric in result.metrics and _is_last(result.metrics):  # held by the callback
            tune.report(_for_tune(result.metrics))


def _for_tune(metrics: dict) -> dict:
    """Tune's `training_iteration` (ASHA's time unit, the sweep table's epochs) is the run's cumulative epoch
    count, which train_worker reports as `epochs_done`: Tune's own counter restarts when a trial is restored
    without (or from an older) checkpoint, while the run resumes from its own `last` checkpoint."""
    out = dict(metrics)
    if "epochs_done" in out:
        out["training_iteration"] = out["epochs_done"]
    return out


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _is_last(metrics: dict) -> bool:
    """The report of the run's last epoch (train_worker reports planned_steps with every epoch)."""
    return metrics.get("global_step", 0) >= metrics.get("planned_steps", float("inf"))


INTERRUPT_MARKER = ".interrupt_requested"


def _interrupt_hook(sweep_dir: str) -> None:
    """Test hook: with LIVR_TUNE_INTERRUPT_AT_REPORT=N the sweep's N-th epoch report (counted over all trials)
    is not sent: the trial asks the driver to stop (RunStatus sends it SIGINT) and waits to be stopped, so that
    the trial resumes from its own checkpoint while Tune holds no result of it."""
    at = int(os.environ.get("LIVR_TUNE_INTERRUPT_AT_REPORT", "0"))
    if not at:
        return
    with open(os.path.join(sweep_dir, ".interrupt_reports"), "a+") as f:
        f.write("report\n")
        f.seek(0)
        count = len(f.read().splitlines())
    if count == at:
        open(os.path.join(sweep_dir, INTERRUPT_MARKER), "w").close()
        time.sleep(600)


def _report(metrics: dict, checkpoint_dir: str | None) -> None:
    has = checkpoint_dir and os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir)
    tune.report(_for_tune(metrics), checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if has else None)


class EpochReportCallback(TuneReportCallback):
    """TuneReportCallback that forwards only the reports carrying the metric (one per epoch), so that
    step checkpoints between epochs (distributed.checkpoint_every) do not count as ASHA iterations; the
    last epoch's report is sent by the trial after fit() returned (the run's artifacts are written)."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self.metric in metrics[0] and not _is_last(metrics[0]):  # the last one: after fit()
            super().after_report(run_context, [_for_tune(metrics[0])], checkpoint)


def make_trainable(setup: dict):
    def livr_trial(params):
        run_trial(params, setup)

    if setup["workers"]:
        return tune.with_resources(livr_trial, {"cpu": 1})  # the trial driver; workers get their own bundles
    return tune.with_resources(livr_trial, setup["resources"])


class RunStatus(tune.Callback):
    """Driver-side: a trial stopped by ASHA ends its MLflow run as KILLED (tag livr.early_stopped=true), an
    errored one as FAILED (a trial that finished has already ended its run as FINISHED).
    Test hooks: LIVR_TUNE_INTERRUPT_AFTER=N sends SIGINT to the driver once N trials have completed; a trial
    that wrote <sweep_dir>/.interrupt_requested (LIVR_TUNE_INTERRUPT_AT_REPORT, see `_interrupt_hook`) too."""

    def __init__(self, sweep_dir: str, uri: str):
        self.sweep_dir, self.uri = sweep_dir, uri

    def _close(self, trial, status: str) -> None:
        id_file = os.path.join(self.sweep_dir, f"trial_{trial.trial_id}", "mlflow_run_id")
        if not os.path.exists(id_file):
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        with open(id_file) as f:
            run_id = f.read().strip()
        now = client.get_run(run_id).info.status
        if status == "KILLED" and now != "FINISHED":  # the trial may have ended it KILLED itself (Tune's sys.exit(0))
            client.set_tag(run_id, "livr.early_stopped", "true")
        if now == "RUNNING":
            client.set_terminated(run_id, status=status)

    def on_step_begin(self, iteration, trials, **info):
        marker = os.path.join(self.sweep_dir, INTERRUPT_MARKER)
        if os.environ.get("LIVR_TUNE_INTERRUPT_AT_REPORT") and os.path.exists(marker):  # the trial-side hook asked
            os.remove(marker)
            os.kill(os.getpid(), signal.SIGINT)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "KILLED")
        _COMPLETED.append(trial.trial_id)
        after = int(os.environ.get("LIVR_TUNE_INTERRUPT_AFTER", "0"))
        if after and len(_COMPLETED) >= after:
            os.kill(os.getpid(), signal.SIGINT)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")


_COMPLETED: list[str] = []  # trials completed in this process (the interrupt test hooks)
