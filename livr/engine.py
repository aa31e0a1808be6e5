"""How one micro-batch's loss becomes an optimizer step: plain torch (all-reduce when world > 1) or a
DeepSpeed ZeRO engine. The training loop (`livr/train.py`) is the same for both.

DeepSpeed configs are the HF-style JSONs users know (`deepspeed_configs/zero{2,3}.json`); every `"auto"`
is resolved from the run config before `deepspeed.initialize` (a raw engine does not resolve them).
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist

from livr.checkpoint import load_checkpoint, save_checkpoint
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


def prebuild_cpu_comm_op() -> None:
    """DeepSpeed on CPU JIT-compiles its shared-memory comm op at first use (~45 s, then cached in
    TORCH_EXTENSIONS_DIR). Build it once in the driver, so that workers starting together do not compile it
    concurrently into the same cache (seen to fail: "Error building extension 'deepspeed_shm_comm'")."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load(verbose=False)


class TorchEngine:
    """Plain torch, one process or DistributedDataParallel across ranks: accumulate, clip, AdamW.

    `micro_step(loss, …)` takes one micro-batch's share of the global-batch loss (its summed NLL / the global
    batch's token count), so the gradient of the global loss is the sum over micro-batches and ranks. DDP
    averages over ranks, hence the loss × world; its bucketed all-reduce overlaps the boundary backward, and
    the other accumulation steps run under `no_sync` (`sync(boundary)`)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, rank: int, world: int):
        self.model, self.opt, self.cfg, self.rank, self.world = model, opt, cfg, rank, world
        self.forward_module = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device = next(p.device for p in model.parameters() if p.requires_grad)
            # every rank built the same model from the same seed: no initial broadcast of the frozen weights
            self.forward_module = DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, init_sync=False,
                broadcast_buffers=False)

    def sync(self, boundary: bool):
        if self.world > 1 and not boundary:
            return self.forward_module.no_sync()
        return contextlib.nullcontext()

    def micro_step(self, loss: torch.Tensor, boundary: bool, lr: float) -> None:
        (loss * self.world).backward()
        if not boundary:
            return
        params = [p for g in self.opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def save(self, path: str, state: dict) -> None:
        if self.rank == 0:
            save_checkpoint(path, self.model, self.opt, state)

    def load(self, path: str) -> dict:
        return load_checkpoint(path, self.model, self.opt)


class DeepSpeedEngine:
    """A DeepSpeed ZeRO engine around the PEFT model."""

    def __init__(self, lm, opt: torch.optim.Optimizer, ds_config: dict, rank: int, world: int):
        import deepspeed

        self.engine, self.opt, _, _ = deepspeed.initialize(model=lm.model, optimizer=opt, config=ds_config,
                                                           dist_init_required=False)
        self.rank, self.world = rank, world
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        lm.model = self.engine  # forward goes through the engine (ZeRO-3 gathers parameters there)
        self.model = self.engine.module
        self.forward_module = self.engine

    def sync(self, boundary: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its own accumulation boundary

    def micro_step(self, loss: torch.Tensor, boundary: bool, lr: float) -> None:
        """`loss`: this micro-batch's share of the global-batch loss (see TorchEngine). DeepSpeed averages
        gradients over the data-parallel ranks, so the share is scaled by the world size, not by 1/accumulation."""
        if boundary:
            for g in self.engine.optimizer.param_groups:
                g["lr"] = lr
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        self.engine.step()

    @property
    def lr(self) -> float:
        return self.engine.optimizer.param_groups[0]["lr"]

    def memory(self) -> dict:
        """Bytes this rank holds: parameters (its ZeRO-3 partition) and optimizer state (its ZeRO shard)."""
        def nbytes(t):
            return t.numel() * t.element_size()

        params = sum(nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else nbytes(p) for p in self.engine.module.parameters())
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        state = sum(nbytes(v) for st in inner.state.values() for v in st.values() if torch.is_tensor(v))
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # fp32 master copies
            state += sum(nbytes(t) for t in getattr(opt, name, []) or [] if torch.is_tensor(t))
        return {"zero_stage": self.stage, "param_bytes": params, "optimizer_bytes": state}

    def save(self, path: str, state: dict) -> None:
        """Every rank writes its shard of the optimizer state (DeepSpeed's own format) into `path`."""
        self.engine.save_checkpoint(path, tag="livr", client_state={"livr_state": state}, save_latest=False)
        if self.rank == 0:
            with open(os.path.join(path, "state.json"), "w") as f:
                json.dump(state, f, indent=1)

    def load(self, path: str) -> dict:
        _, client = self.engine.load_checkpoint(path, tag="livr", load_module_strict=False)
        if client is None:
            from livr.checkpoint import CheckpointError

            raise CheckpointError(f"checkpoint {path} has no DeepSpeed state (tag 'livr')")
        return client["livr_state"]


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
    from livr.model import resolve_device, resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device))
    ds = resolve_ds_config(load_ds_config(cfg.distributed.deepspeed), cfg, world, dtype)
    return Zero3Loading(ds) if ds.get("zero_optimization", {}).get("stage") == 3 else None


def make_engine(lm, opt, cfg: Config, rank: int, world: int):
    if not cfg.distributed.deepspeed:
        return TorchEngine(lm.model, opt, cfg, rank, world)
    ds = resolve_ds_config(load_ds_config(cfg.distributed.deepspeed), cfg, world, lm.dtype)
    return DeepSpeedEngine(lm, opt, ds, rank, world)


def gathered(engine, modifier_rank: int | None = None, with_embeddings: bool = False):
    """Under ZeRO-3, a context in which the trainable parameters (and optionally the input embedding
    table) are whole, for saving or loading them; a no-op otherwise."""
    if getattr(engine, "stage", 0) != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for p in engine.model.parameters() if p.requires_grad]
    if with_embeddings:
        params += [p for p in engine.model.get_input_embeddings().parameters() if not p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
