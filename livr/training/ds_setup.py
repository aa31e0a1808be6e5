"""DeepSpeed's side of a run before its engine exists: the HF-style ZeRO JSON (`deepspeed_configs/zero{2,3}.json`)
loaded and every "auto" resolved from the run config (a raw engine does not resolve them), ZeRO-3's one-line checks
and its partitioned loading, and the CPU ops DeepSpeed JIT-builds, built once. The engines are livr.training.engine."""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from livr.config import Config, ConfigError


def load_ds_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config: distributed.deepspeed={path!r}: file not found")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config: distributed.deepspeed={path!r}: not valid JSON ({e})") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"config: distributed.deepspeed={path!r}: zero_optimization.stage={stage!r} does not exist (0-3)")
    return ds


def resolve_ds_config(ds: dict, cfg: Config, world: int, dtype: torch.dtype) -> dict:
    """Replace every "auto" with the run's values (micro-batch, accumulation, clipping, precision)."""
    t = cfg.train
    values = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": t.grad_accum,
              "train_batch_size": t.micro_batch_size * t.grad_accum * world, "gradient_clipping": t.max_grad_norm}
    out = {k: (values.get(k, v) if v == "auto" else v) for k, v in ds.items()}
    for k, v in values.items():
        out.setdefault(k, v)
    for key, want in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if isinstance(out.get(key), dict) and out[key].get("enabled") == "auto":
            out[key] = {**out[key], "enabled": dtype == want}
    zero = dict(out.get("zero_optimization", {}))
    for k, v in list(zero.items()):
        if v == "auto":
            zero.pop(k)  # DeepSpeed's own default
    out["zero_optimization"] = zero
    out["zero_allow_untested_optimizer"] = True
    leftover = [k for k, v in out.items() if v == "auto"]
    if leftover:
        raise ConfigError(f"config: distributed.deepspeed: cannot resolve \"auto\" for {', '.join(leftover)}")
    return out


ZERO3_CHECKPOINTING_MIN = (0, 19, 3)  # DeepSpeed PR #8148 (transformers #47254): non-reentrant checkpointing


def check_zero3(cfg: Config, ds: dict, version: str | None = None) -> None:
    """One-line ConfigErrors before anything loads: ZeRO-3 with gradient checkpointing on a DeepSpeed older than
    0.19.3 (its non-reentrant checkpointing breaks partitioned parameters)."""
    if ds.get("zero_optimization", {}).get("stage") != 3 or not cfg.model.gradient_checkpointing:
        return
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    have = tuple(int(x) for x in version.split("+")[0].split(".")[:3] if x.isdigit())
    if have < ZERO3_CHECKPOINTING_MIN:
        raise ConfigError(f"config: model.gradient_checkpointing=true under ZeRO-3 needs deepspeed >= 0.19.3 (this is "
                          f"{version}: transformers #47254, DeepSpeed PR #8148); upgrade DeepSpeed or use ZeRO-2")


def check_zero3_rows(splits: dict) -> None:
    """Under ZeRO-3 every rank must run the partitioned vision tower the same number of times: a row without an
    image would make its rank skip it while the others wait in the gather (a hang). A one-line DataError."""
    from livr.data.tasks import DataError

    for name, rows in splits.items():
        i = rows.first_without_image() if hasattr(rows, "first_without_image") else None
        if i is not None:
            row = rows[i]
            raise DataError(f"{name} split: task {row.get('sub_task')} idx={row.get('idx')} has no image; under ZeRO-3 "
                            "every row needs one (a text-only row stalls the other ranks' vision gather); drop it "
                            "or use ZeRO-2")


def offloads_optimizer(ds: dict) -> bool:
    """True when the ZeRO config moves the optimizer states to the host (offload_optimizer to cpu or nvme)."""
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") in ("cpu", "nvme")


def prebuild_cpu_comm_op() -> None:
    """DeepSpeed on CPU JIT-compiles its shared-memory comm op at first use (~45 s, then cached in
    TORCH_EXTENSIONS_DIR). Build it once in the driver, so that workers starting together do not compile it
    concurrently into the same cache (seen to fail: "Error building extension 'deepspeed_shm_comm'")."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)


def prebuild_cpu_ops() -> None:
    """The CPU machine's JIT-built DeepSpeed ops, built once into TORCH_EXTENSIONS_DIR (launch/env.sh calls this at
    set-up): the shared-memory comm op, and CPU Adam (~60 s), which an offloaded optimizer runs."""
    prebuild_cpu_comm_op()
    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder

    CPUAdamBuilder().load(verbose=False)


class Zero3Loading:
    """ZeRO-3: the backbone is built straight into partitions (`from_pretrained` under `zero.Init`, through an
    `HfDeepSpeedConfig` kept alive), so no rank ever holds the whole model. Before PEFT wraps it, zero.Init is
    switched off (PEFT 0.21's own ZeRO-3 branch for trainable token rows needs CUDA) and the embedding
    tables are gathered while PEFT copies the latent rows; `deepspeed.initialize` partitions the rest."""

    def __init__(self, ds_config: dict):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        if dist.is_initialized():  # deepspeed.comm wraps the existing (Ray's) process group
            deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        self._hf = HfDeepSpeedConfig(ds_config)

    def before_peft(self, model):
        import deepspeed
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        self._hf = None
        tables = [model.get_input_embeddings(), model.get_output_embeddings()]
        resized = {id(p) for m in tables if m is not None for p in m.parameters()}  # new tables from the resize
        self.built_partitioned = all(hasattr(p, "ds_id") for p in model.parameters() if id(p) not in resized)
        params = list({id(p): p for m in tables if m is not None for p in m.parameters()}.values())
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def zero3_loading(cfg: Config, world: int) -> Zero3Loading | None:
    if not cfg.distributed.deepspeed:
        return None
    from livr.model.device import resolve_device, resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device))
    ds = resolve_ds_config(load_ds_config(cfg.distributed.deepspeed), cfg, world, dtype)
    check_zero3(cfg, ds)
    return Zero3Loading(ds) if ds.get("zero_optimization", {}).get("stage") == 3 else None
