"""A lost driver (issue 30 #5): the `livr train` driver of a Ray run on two raylets is killed with SIGKILL mid-run
(no handler runs); the same command run again resumes from the last reported checkpoint, into the same MLflow run,
with every step's loss logged exactly once and the run finishing where an uninterrupted one would; the checkpoints
the dead driver's workers uploaded but Ray never registered are removed from the storage."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow  # real clusters / servers / whole runs: not in the fast tier

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # (the clusters below start from this process)
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LIVR_QUIET": "1",
       "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0",
       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def _launch(args, log):
    return subprocess.Popen([sys.executable, "-m", "livr.cli", "train", "--config", "configs/demo.yaml", *args],
                            cwd=ROOT, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)


def _state(run_dir):
    try:
        return json.loads(Path(run_dir, "checkpoints", "last", "state.json").read_text())
    except (OSError, ValueError):
        return None


def test_driver_killed_then_same_command_resumes(backbone_cache, data_cache, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 1024**2,
                                                            "include_dashboard": False})
    procs = []
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2)
        cluster.wait_for_nodes()
        args = tiny_overrides(backbone_cache, data_cache, tmp_path, name="lost", **{
            "distributed.num_workers": 2, "distributed.address": cluster.address, "train.micro_batch_size": 2,
            "train.stage1_steps": 16, "train.stage2_steps": 4, "distributed.checkpoint_every": 2,
            "train.eval_every_epoch": False, "eval.splits": "[val]", "data.num_workers": 0,
            "distributed.storage_path": str(tmp_path / "shared"), "distributed.storage_shared": True})
        run_dir = str(tmp_path / "runs" / "lost")
        with open(tmp_path / "first.log", "w") as log:
            first = _launch(args, log)
            procs.append(first)
            start = time.monotonic()
            while (_state(run_dir) or {}).get("global_step", 0) < 6:  # a few checkpoints reported, mid-stage
                assert first.poll() is None, (tmp_path / "first.log").read_text()
                assert time.monotonic() - start < 240, "the first launch did not reach step 6"
                time.sleep(0.2)
            first.send_signal(signal.SIGKILL)  # the driver alone: no handler, no cleanup; Ray reaps its workers
            first.wait()
        killed_at = _state(run_dir)["global_step"]
        assert killed_at < 20
        with open(tmp_path / "second.log", "w") as log:
            second = _launch(args, log)
            procs.append(second)
            assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
        final = json.loads(Path(run_dir, "final_metrics.json").read_text())
        assert final["global_step"] == 20
        resumed = final["resumed_from"]
        assert len(resumed) == 1 and 2 <= resumed[0] <= killed_at and resumed[0] % 2 == 0, (resumed, killed_at)
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("livr-demo").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, ended
        run_id = runs[0].info.run_id
        steps = [m.step for k in ("stage1/loss", "stage2/loss") for m in client.get_metric_history(run_id, k)]
        assert sorted(steps) == list(range(1, 21)), sorted(steps)  # nothing lost, nothing logged twice
        # the checkpoints uploaded but never registered when the driver died are removed: num_to_keep (2) remain
        kept = sorted(p.name for p in (tmp_path / "shared" / "lost").iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
        assert len(kept) == 2, kept
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        ray.shutdown()
        cluster.shutdown()
