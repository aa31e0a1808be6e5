"""The process group a training process makes is destroyed by that process before it exits.

Left to interpreter exit, a gloo group that DeepSpeed still holds (its world group in `deepspeed.utils.groups`) was
finalised with gloo's threads running: a 2-rank spawned test died with SIGABRT ("terminate called without an active
exception") in 2 of 23 runs, and in 0 of 85 once the ranks called `teardown_distributed`. Here, in a fresh process:
after a ZeRO-2 step, teardown leaves no group, none held by DeepSpeed, and none of the variables livr set for the
one-process group (a second group in the same process gets a new port); the CLI tears down whatever command ran."""
import subprocess
import sys

from conftest import ROOT

SCRIPT = """
import os, sys, types, torch, torch.distributed as dist
from livr.config import load_config
from livr.training.distributed import setup_distributed, teardown_distributed
from livr.training.ds_setup import load_ds_config, resolve_ds_config
from livr.training.engine import DeepSpeedEngine
import deepspeed.utils.groups as groups

cfg = load_config(None, ["distributed.deepspeed=deepspeed_configs/zero2.json", "train.grad_accum=1",
                         "train.micro_batch_size=2"])
setup_distributed(cfg)
port = os.environ["MASTER_PORT"]
model = torch.nn.Linear(8, 4)
ds = resolve_ds_config(load_ds_config("deepspeed_configs/zero2.json"), cfg, 1, torch.float32)
engine = DeepSpeedEngine(types.SimpleNamespace(model=model), torch.optim.AdamW(model.parameters()), ds, 0, 1)
engine.micro_step(engine.forward_module(torch.ones(2, 8)).pow(2).mean(), True, 0.1)
print("held", groups._WORLD_GROUP is not None)
teardown_distributed()
print("after", dist.is_initialized(), groups._WORLD_GROUP, [k for k in ("RANK", "MASTER_PORT") if k in os.environ])
setup_distributed(cfg)
print("again", dist.get_world_size(), os.environ["MASTER_PORT"] != port)
from livr.cli import main
print("cli", main(["config", "show"]) == 0, dist.is_initialized(), "MASTER_PORT" in os.environ)
"""


def test_teardown_leaves_no_group_and_takes_back_its_environment():
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "LIVR_QUIET": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": f"{ROOT}/.venv/torch_extensions"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith(("held", "after", "again", "cli"))]
    assert lines == ["held True", "after False None []", "again 1 True", "cli True False False"], r.stdout[-2000:]
