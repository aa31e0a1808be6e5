"""Shared test set-up: offline, quiet, everything written under pytest's tmp dirs."""
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LIVR_QUIET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@pytest.fixture(scope="session")
def backbone_cache(tmp_path_factory):
    """One directory where each tiny preset is materialised once per test session."""
    return str(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def zero3_json(tmp_path, offload: bool = False) -> str:
    """A ZeRO-3 JSON (as shipped, `zero3_offload.json` with `offload`) that really partitions a tiny model."""
    import json

    with open(os.path.join(ROOT, "deepspeed_configs", f"{'zero3_offload' if offload else 'zero3'}.json")) as f:
        ds = json.load(f)  # (offload: no optimizer in it; livr runs DeepSpeed's CPU Adam there)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    path = tmp_path / ("zero3_offload_test.json" if offload else "zero3_test.json")
    path.write_text(json.dumps(ds))
    return str(path)


def tiny_overrides(backbone_cache: str, data_cache: str, tmp_path, **extra) -> list[str]:
    """key=value overrides for a fast tiny run writing only under tmp dirs."""
    base = {
        "model.cache_dir": backbone_cache, "data.cache_dir": data_cache, "output_dir": str(tmp_path / "runs"),
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", "tracking.artifact_location": str(tmp_path / "artifacts"),
        "data.train_size": 16, "data.val_size": 8, "data.test_size": 8, "train.micro_batch_size": 4,
        "train.grad_accum": 1, "latents.num_latents": 4, "lora.r": 4, "train.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def livr_train(overrides: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`livr train` as a user runs it: one process, no launcher, no RANK/WORLD_SIZE in the environment."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "livr.cli", "train", "--config", os.path.join(ROOT, "configs/demo.yaml"),
                           *overrides], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
