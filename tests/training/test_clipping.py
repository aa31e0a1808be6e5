"""Gradient clipping is applied (issue 30 #8): `train.max_grad_norm` bounds the update of a real step on the torch
engine and on a DeepSpeed ZeRO-2 engine (its `gradient_clipping` resolved from the run config). Plain SGD with
lr 1 makes the update the clipped gradient itself, so its norm is the clip threshold exactly."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from livr.config import load_config
from livr.training.distributed import teardown_distributed
from livr.training.ds_setup import load_ds_config, resolve_ds_config
from livr.training.engine import TorchEngine

CLIP = 0.5


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 4)


def _step(engine, model) -> float:
    """One optimizer step of a loss whose gradient norm is far above CLIP; the norm of the update."""
    before = [p.detach().clone() for p in model.parameters()]
    loss = 1000.0 * model(torch.ones(2, 8)).pow(2).sum()
    engine.micro_step(loss, True, 1.0)
    return torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before))).item()


def test_torch_engine_clips_to_max_grad_norm():
    cfg = load_config(None, [f"train.max_grad_norm={CLIP}", "train.grad_accum=1"])
    model = _model()
    unclipped = torch.autograd.grad(1000.0 * model(torch.ones(2, 8)).pow(2).sum(), list(model.parameters()))
    assert torch.sqrt(sum((g ** 2).sum() for g in unclipped)).item() > 100 * CLIP  # clipping has work to do
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), cfg, 0, 1)
    assert _step(engine, model) == pytest.approx(CLIP, rel=1e-4)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_deepspeed_configs_clip_at_max_grad_norm(name):
    cfg = load_config(None, [f"train.max_grad_norm={CLIP}"])
    ds = resolve_ds_config(load_ds_config(os.path.join("deepspeed_configs", name)), cfg, 1, torch.float32)
    assert ds["gradient_clipping"] == CLIP
    without = {k: v for k, v in load_ds_config(os.path.join("deepspeed_configs", name)).items() if k != "gradient_clipping"}
    assert resolve_ds_config(without, cfg, 1, torch.float32)["gradient_clipping"] == CLIP  # absent: the run's value


def _ds_worker(rank: int, init: str, out: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        from livr.training.engine import DeepSpeedEngine

        cfg = load_config(None, [f"train.max_grad_norm={CLIP}", "train.grad_accum=1", "train.micro_batch_size=2"])
        ds = resolve_ds_config(load_ds_config("deepspeed_configs/zero2.json"), cfg, 1, torch.float32)
        lm = SimpleNamespace(model=_model())
        engine = DeepSpeedEngine(lm, torch.optim.SGD(lm.model.parameters(), lr=1.0), ds, 0, 1)
        result = {"update_norm": _step(engine, engine.model)}
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        teardown_distributed()


def test_deepspeed_engine_clips_to_max_grad_norm(tmp_path):
    """A real ZeRO-2 step (one gloo rank, a spawned process): the update's norm is max_grad_norm."""
    from livr.training.ds_setup import prebuild_cpu_comm_op

    prebuild_cpu_comm_op()
    out = str(tmp_path / "out.json")
    mp.spawn(_ds_worker, nprocs=1, join=True, args=(str(tmp_path / "pg"), out))
    with open(out) as f:
        assert json.load(f)["update_norm"] == pytest.approx(CLIP, rel=1e-4)
