"""What a first GPU run needs, tested on CPU (issue 25): DeepSpeed in one process (the single-GPU mode) with ZeRO-3
and CPU offload (DeepSpeed's CPU Adam), killed and resumed; config-time refusals before anything loads."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _offload_json(tmp_path) -> str:
    with open(os.path.join(ROOT, "deepspeed_configs", "zero3_offload.json")) as f:
        ds = json.load(f)  # as shipped (no optimizer in it: livr picks DeepSpeed's CPU Adam for the offload)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # really partition the tiny model
    path = tmp_path / "zero3_offload.json"
    path.write_text(json.dumps(ds))
    return str(path)


def _livr_train(overrides: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`livr train` as a user runs it: one process, no launcher, no RANK/WORLD_SIZE in the environment."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "livr.cli", "train", "--config", os.path.join(ROOT, "configs/demo.yaml"),
                           *overrides], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_one_process_zero3_offload_trains_two_stages_and_resumes_exactly(backbone_cache, data_cache, tmp_path):
    ds = _offload_json(tmp_path)
    base = tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "distributed.deepspeed": ds, "train.stage1_steps": 2, "train.stage2_steps": 2, "distributed.checkpoint_every": 1,
        "data.num_workers": 0, "eval.splits": "[val]"})
    whole = _livr_train(base + ["name=whole"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "mpi4py" not in whole.stderr
    cut = _livr_train(base + ["name=cut"], {"LIVR_FAIL_AT_STEP": "3"})
    assert cut.returncode != 0 and "injected failure at step 3" in cut.stderr, cut.stderr[-2000:]
    again = _livr_train(base + ["name=cut"])
    assert again.returncode == 0, again.stderr[-3000:]
    runs = tmp_path / "runs"
    got = {n: json.loads((runs / n / "final_metrics.json").read_text()) for n in ("whole", "cut")}
    assert got["whole"]["global_step"] == got["cut"]["global_step"] == 4
    assert got["cut"]["resumed_from"] == [2] and got["whole"]["resumed_from"] == []
    meta = json.loads((runs / "cut" / "checkpoints" / "last" / "optimizer.json").read_text())
    assert meta["zero_stage"] == 3 and meta["optimizer"] == "DeepSpeedCPUAdam", meta
    # AdamW's moments are bit-identical (so was every gradient). The weights agree to an ulp: CPU Adam's C++ kernel
    # keeps beta^t as a running product, and after a restore recomputes it once with std::pow (DeepSpeed
    # csrc/includes/cpu_adam.h IncrementStep), so the bias correction differs in its last bit.
    for f, exact in (("optimizer.safetensors", True), ("trainable.safetensors", False)):
        a, b = (load_file(str(runs / n / "checkpoints" / "last" / f)) for n in ("whole", "cut"))
        assert a.keys() == b.keys() and a
        for k in a:
            same = torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
            assert same, (f, k, (a[k] - b[k]).abs().max().item())
    moments = load_file(str(runs / "whole" / "checkpoints" / "last" / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg_sq") and v.abs().sum() > 0 for k, v in moments.items())
