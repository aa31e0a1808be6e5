"""Preemption and crashes: SIGTERM / SIGINT write a checkpoint and end the MLflow run KILLED; a crash ends it
FAILED; the same command resumes, into the same MLflow run, with nothing lost or logged twice."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow  # real clusters / servers / whole runs: not in the fast tier


def _launch(overrides, tmp_path, env_extra=None):
    env = {**os.environ, "LIVR_QUIET": "1", **(env_extra or {})}
    log = open(tmp_path / f"log-{time.monotonic_ns()}.txt", "w+")  # noqa: SIM115 - closed by _finish
    cfg = tmp_path / "empty.yaml"  # the defaults + overrides, as the in-process tests use
    cfg.write_text("{}\n")
    proc = subprocess.Popen([sys.executable, "-m", "livr.cli", "train", "--config", str(cfg), *overrides], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc, log


def _finish(proc, log, timeout=240):
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.seek(0)
    text = log.read()
    log.close()
    return rc, text


def _wait_training(tmp_path, run_dir, proc, after_step=0, timeout=180):
    """Until this launch has logged an optimizer step after `after_step` to MLflow: inside the loop."""
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            _, out = _finish(proc, proc.log)
            raise AssertionError(f"the run ended before training started: {out}")
        assert time.monotonic() - start < timeout, "the run did not start training"
        if os.path.exists(os.path.join(run_dir, "mlflow_run_id")):
            client, run_id = _mlflow(tmp_path, run_dir)
            steps = [m.step for k in ("stage1/loss", "stage2/loss") for m in client.get_metric_history(run_id, k)]
            if steps and max(steps) > after_step + 2:
                return
        time.sleep(0.3)


def _state(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "last", "state.json")) as f:
        return json.load(f)


def _mlflow(tmp_path, run_dir):
    from mlflow.tracking import MlflowClient

    with open(os.path.join(run_dir, "mlflow_run_id")) as f:
        run_id = f.read().strip()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client, run_id


def test_sigterm_sigint_and_crash_end_the_run_and_resume(backbone_cache, data_cache, tmp_path):
    # long enough that the signals land mid-stage; no per-epoch evaluation so that steps are the whole cost
    over = tiny_overrides(backbone_cache, data_cache, tmp_path, name="preempted", **{
        "train.stage1_steps": 60, "train.stage2_steps": 60, "train.eval_every_epoch": False,
        "eval.splits": "[val]", "data.num_workers": 1})
    run_dir = str(tmp_path / "runs" / "preempted")

    # 1. SIGTERM (a scheduler's preemption) to the whole process group, as a cluster manager sends it
    proc, log = _launch(over, tmp_path)
    _wait_training(tmp_path, run_dir, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    rc, out = _finish(proc, log)
    assert rc == 128 + signal.SIGTERM, out
    assert "Traceback" not in out, out
    assert "stopped by SIGTERM" in out and f"resume with: livr train --config {run_dir}/config.yaml" in out
    first = _state(run_dir)
    assert 0 < first["global_step"] < 120 and first["step"] > 0  # mid-stage, not an epoch boundary
    client, run_id = _mlflow(tmp_path, run_dir)
    assert client.get_run(run_id).info.status == "KILLED"

    # 2. the same command resumes; SIGINT (Ctrl-C) stops it again
    proc, log = _launch(over, tmp_path)
    _wait_training(tmp_path, run_dir, proc, after_step=first["global_step"])
    os.killpg(proc.pid, signal.SIGINT)
    rc, out = _finish(proc, log)
    assert rc == 128 + signal.SIGINT and "Traceback" not in out and "stopped by SIGINT" in out, out
    second = _state(run_dir)
    assert second["global_step"] > first["global_step"]
    assert second["resumed_from"] == [first["global_step"]]
    assert client.get_run(run_id).info.status == "KILLED"

    # 3. a crash: FAILED, with where the last checkpoint is
    crash_at = second["global_step"] + 1  # before any epoch-end checkpoint (those come after the step's failure point)
    proc, log = _launch(over, tmp_path, {"LIVR_FAIL_AT_STEP": str(crash_at), "LIVR_FAIL_MODE": "raise"})
    rc, out = _finish(proc, log)
    assert rc != 0 and f"injected failure at step {crash_at}" in out, out
    assert f"the last checkpoint is at global step {second['global_step']}" in out, out
    assert client.get_run(run_id).info.status == "FAILED"

    # 4. the same command finishes the run: one MLflow run, every step's loss logged exactly once
    proc, log = _launch(over, tmp_path)
    rc, out = _finish(proc, log)
    assert rc == 0, out
    with open(os.path.join(run_dir, "final_metrics.json")) as f:
        final = json.load(f)
    assert final["global_step"] == 120  # the crashed launch wrote no checkpoint: it is not in the history
    assert final["resumed_from"] == [first["global_step"], second["global_step"]]
    assert client.get_run(run_id).info.status == "FINISHED"
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    steps = [m.step for k in ("stage1/loss", "stage2/loss") for m in client.get_metric_history(run_id, k)]
    # the steps between the last checkpoint and the crash ran twice (bit-identically): logged once
    assert sorted(steps) == list(range(1, 121)), sorted(set(range(1, 121)) - set(steps))
    # validated at the end of each stage (eval_every_epoch=false), each logged once
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [60, 120]
