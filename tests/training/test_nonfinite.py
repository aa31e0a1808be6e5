"""Non-finite steps (issue 30 #1): a step whose loss or gradient norm is nan/inf is not applied, counted in MLflow
and named in the log with its rows' idx; past train.max_nonfinite_skips consecutive skips (or at once with
train.nonfinite=stop) the run stops with a checkpoint of the last finite state and a one-line error; no saved
tensor is ever non-finite. Faults planted for real: optim.lr=1e30 on the demo config, and a NaN loss in chosen
steps (LIVR_NAN_AT_STEPS, the loop's test hook) whose gradients are then NaN through the real backward."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, tiny_overrides
from safetensors.torch import load_file

from livr.config import load_config
from livr.training.checkpoint import save_best, verify_checkpoint, write_checkpoint
from livr.training.distributed import teardown_distributed
from livr.training.nonfinite import NonFiniteError
from livr.training.train import train_worker


def _all_finite(run_dir: str) -> list[str]:
    files = glob.glob(os.path.join(run_dir, "**", "*.safetensors"), recursive=True)
    for f in files:
        for k, t in load_file(f).items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), (f, k)
    return files


@pytest.mark.slow
def test_lr_1e30_stops_with_a_finite_checkpoint_and_one_line(backbone_cache, data_cache, tmp_path):
    over = tiny_overrides(backbone_cache, data_cache, tmp_path, name="boom", **{
        "optim.lr": 1e30, "train.stage1_steps": 20, "train.stage2_steps": 4, "train.max_nonfinite_skips": 3,
        "eval.splits": "[val]", "data.num_workers": 0})
    out = subprocess.run([sys.executable, "-m", "livr.cli", "train", "--config", "configs/demo.yaml", *over], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    err = out.stderr
    assert out.returncode == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("livr: error:")]
    assert len(errors) == 1 and "more than train.max_nonfinite_skips=3" in errors[0], err
    skipped = [line for line in err.splitlines() if "optimizer step skipped" in line]
    assert len(skipped) == 4 and all("idx=['Counting_train_" in line for line in skipped), err
    step = int(skipped[-1].split("(global step ")[1].split(")")[0])
    assert f"up to global step {step}" in errors[0] and f"the last checkpoint is at global step {step}" in errors[0]
    run_dir = str(tmp_path / "runs" / "boom")
    verify_checkpoint(os.path.join(run_dir, "checkpoints", "last"))
    assert len(_all_finite(run_dir)) >= 2  # the checkpoint (and any best) hold the last finite state
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = Path(run_dir, "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "FAILED"
    skips = client.get_metric_history(run_id, "stage1/nonfinite_skips")
    assert [m.value for m in sorted(skips, key=lambda m: m.step)] == [1, 2, 3, 4]


def _run_with_nan(backbone_cache, data_cache, tmp_path, monkeypatch, steps: str, **extra):
    """A tiny run with NaN planted in `steps`; the trainable weights after every step (a checkpoint each step)."""
    monkeypatch.setenv("LIVR_NAN_AT_STEPS", steps)
    cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, name="nan", **{
        "train.stage1_steps": 6, "train.stage2_steps": 2, "distributed.checkpoint_every": 1, "optim.lr": 1e-2,
        "eval.splits": "[val]", "data.num_workers": 0, **extra}))
    seen = {}

    def report(metrics, ckpt):
        seen[metrics["global_step"]] = load_file(os.path.join(ckpt, "trainable.safetensors"))

    try:
        result = train_worker(cfg, report=report)
    except NonFiniteError as e:
        result = e
    return cfg, seen, result


def test_planted_nan_steps_are_skipped_and_the_run_goes_on(backbone_cache, data_cache, tmp_path, monkeypatch, capsys):
    cfg, seen, result = _run_with_nan(backbone_cache, data_cache, tmp_path, monkeypatch, "2,3",
                                      **{"train.max_nonfinite_skips": 2})
    assert result["global_step"] == 8  # two consecutive skips are within the limit: the run finishes
    err = capsys.readouterr().err
    for step in (2, 3):
        assert f"(global step {step}): non-finite loss nan" in err and "optimizer step skipped" in err
    same = lambda a, b: all(torch.equal(seen[a][k], seen[b][k]) for k in seen[a])
    assert same(1, 2) and same(2, 3) and not same(3, 4) and not same(4, 5)  # 2 and 3 not applied
    state = json.loads(Path(cfg.run_dir, "checkpoints", "last", "state.json").read_text())
    assert state["nonfinite_skips"] == 2 and state["nonfinite_run"] == 0
    _all_finite(cfg.run_dir)


def test_stop_policy_stops_at_once_with_the_last_finite_state(backbone_cache, data_cache, tmp_path, monkeypatch):
    cfg, seen, result = _run_with_nan(backbone_cache, data_cache, tmp_path, monkeypatch, "3",
                                      **{"train.nonfinite": "stop"})
    assert isinstance(result, NonFiniteError) and "\n" not in str(result), result
    assert "global step 3 (train.nonfinite=stop)" in str(result) and "last checkpoint is at global step 3" in str(result)
    assert max(seen) == 3 and all(torch.equal(seen[2][k], seen[3][k]) for k in seen[2])  # step 3 not applied
    _all_finite(cfg.run_dir)


def test_stop_at_a_stages_last_step_ends_the_stage_first_and_resumes(backbone_cache, data_cache, tmp_path, monkeypatch):
    """Stage 1's last step (6) is non-finite: its validation and stage end come first, so the resumed run starts
    Stage 2 at its step 0 and ends where an uninterrupted run ends."""
    cfg, _, result = _run_with_nan(backbone_cache, data_cache, tmp_path, monkeypatch, "6",
                                      **{"train.nonfinite": "stop"})
    assert isinstance(result, NonFiniteError) and "global step 6 (train.nonfinite=stop)" in str(result), result
    state = json.loads(Path(cfg.run_dir, "checkpoints", "last", "state.json").read_text())
    assert (state["stage"], state["step"], state["global_step"]) == (1, 0, 6)
    assert [h["step"] for h in state["history"]] == [4, 6]  # Stage 1 validated at its end
    monkeypatch.delenv("LIVR_NAN_AT_STEPS")
    final = train_worker(cfg)
    assert final["global_step"] == 8 and final["resumed_from"] == [6]


def test_saves_refuse_nonfinite_tensors(tmp_path):
    bad = {"w": torch.tensor([1.0, float("nan")]), "ok": torch.ones(2)}
    with pytest.raises(NonFiniteError, match=r"refusing to write .*ck: w holds 1 nan/inf value\(s\) of 2"):
        write_checkpoint(str(tmp_path / "ck"), bad, {}, {}, {}, [])
    assert not os.path.exists(tmp_path / "ck")
    save_best(str(tmp_path), {"w": torch.ones(2)}, {"val_accuracy": 0.5})
    with pytest.raises(NonFiniteError, match="best.safetensors: w holds"):
        save_best(str(tmp_path), {"w": torch.tensor([float("inf"), 0.0])}, {"val_accuracy": 0.9})
    assert torch.equal(load_file(str(tmp_path / "best.safetensors"))["w"], torch.ones(2))  # the previous best stays
    from livr.training.engine import TorchEngine

    model = torch.nn.Linear(2, 2)
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), load_config(None, []), 0, 1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"eng: weight holds 1 nan/inf"):  # checked on the device, every rank
        engine.save(str(tmp_path / "eng"), {"global_step": 1})
    assert not os.path.exists(tmp_path / "eng")


# ----------------------------------------------------------------------------- every rank takes the same decision
def _rank_worker(rank: int, init: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        from livr.training.ds_setup import load_ds_config, resolve_ds_config
        from livr.training.engine import DeepSpeedEngine, TorchEngine

        cfg = load_config(None, ["train.grad_accum=1", "train.micro_batch_size=2"])
        results = {}
        for kind in ("ddp", "zero2"):
            torch.manual_seed(0)
            model = torch.nn.Linear(8, 4)
            opt = torch.optim.AdamW(model.parameters(), lr=0.1)
            if kind == "ddp":
                engine = TorchEngine(model, opt, cfg, rank, 2)
            else:
                ds = resolve_ds_config(load_ds_config("deepspeed_configs/zero2.json"), cfg, 2, torch.float32)
                engine = DeepSpeedEngine(SimpleNamespace(model=model), opt, ds, rank, 2)
            steps = []
            # step 1: NaN on rank 1 only; step 2: finite everywhere; step 3: rank 1's loss inf, its gradients finite
            for poison in ("nan", None, "inf-loss"):
                before = [p.detach().clone() for p in engine.model.parameters()]
                loss = engine.forward_module(torch.full((2, 8), float(rank + 1))).pow(2).mean() / 2
                if poison == "nan" and rank == 1:
                    loss = loss * float("nan")
                step_loss = loss.detach() * (float("inf") if poison == "inf-loss" and rank == 1 else 1.0)
                engine.micro_step(loss, True, 0.1, step_loss)
                moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, engine.model.parameters()))
                steps.append({"finite": engine.last.finite, "applied": engine.last.applied, "moved": moved})
            results[kind] = steps
        with open(out + f".{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        teardown_distributed()


@pytest.mark.slow
def test_every_rank_skips_a_step_one_rank_made_nonfinite(tmp_path):
    """DDP and ZeRO-2 on 2 gloo ranks: NaN on rank 1 alone; both ranks skip it, both apply the next step. A loss
    that is inf on rank 1 alone while every gradient is finite: DDP skips on both ranks; ZeRO-2 (whose overflow
    check reads gradients only) applies it, and both ranks know (the loop then stops on both)."""
    from livr.training.ds_setup import prebuild_cpu_comm_op

    prebuild_cpu_comm_op()
    out = str(tmp_path / "out")
    mp.spawn(_rank_worker, nprocs=2, join=True, args=(str(tmp_path / "pg"), out))
    for rank in (0, 1):
        with open(f"{out}.{rank}.json") as f:
            res = json.load(f)
        for kind in ("ddp", "zero2"):
            last = {"finite": False, "applied": kind == "zero2", "moved": kind == "zero2"}
            assert res[kind] == [{"finite": False, "applied": False, "moved": False},
                                 {"finite": True, "applied": True, "moved": True}, last], (rank, kind, res[kind])


@pytest.mark.slow
def test_ray_workers_stop_together_and_the_driver_says_one_line(backbone_cache, data_cache, tmp_path):
    """Two Ray Train workers (DDP), NaN planted on rank 1 only, train.nonfinite=stop: both ranks take the decision,
    the driver ends with the worker's one-line error (exit 2), the checkpoint of the last finite state in place."""
    over = tiny_overrides(backbone_cache, data_cache, tmp_path, name="ray-nan", **{
        "distributed.num_workers": 2, "train.micro_batch_size": 2, "train.stage1_steps": 6, "train.stage2_steps": 2,
        "train.nonfinite": "stop", "eval.splits": "[val]", "data.num_workers": 0, "distributed.checkpoint_every": 1})
    env = {**os.environ, "LIVR_NAN_AT_STEPS": "3", "LIVR_NAN_RANK": "1", "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "livr.cli", "train", "--config", "configs/demo.yaml", *over], cwd=ROOT,
                         capture_output=True, text=True, timeout=400, check=False, env=env)
    err = out.stdout + out.stderr
    assert out.returncode == 2, err[-3000:]
    last = [line for line in out.stderr.splitlines() if line.startswith("livr: error:")]
    last = last[-1] if last else ""
    assert last.startswith("livr: error: training stopped: non-finite loss nan") and "global step 3" in last, last
    for rank in (0, 1):
        assert f"rank {rank}: stage1 step 3 (global step 3): non-finite loss nan" in err, err[-3000:]
    for noise in ("Failed to query Ray Train Controller actor state", "is_gradient_checkpointing",
                  "Setting accelerator to CPU"):  # (livr.utils.console: filtered in the driver and in every Ray worker)
        assert noise not in err, f"known noise on the console: {noise!r}"
    state = json.loads(Path(tmp_path, "runs", "ray-nan", "checkpoints", "last", "state.json").read_text())
    assert state["global_step"] == 3 and state["nonfinite_skips"] == 1
    _all_finite(str(tmp_path / "runs" / "ray-nan"))
