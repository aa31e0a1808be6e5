"""How one micro-batch's loss becomes an optimizer step: plain torch (all-reduce when world > 1) or a
DeepSpeed ZeRO engine. The training loop (`livr/training/train.py`) is the same for both.

DeepSpeed's config, its ZeRO-3 checks and loading: livr.training.ds_setup.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist

from livr.config import Config
from livr.training.checkpoint import (
    CheckpointError,
    check_batch,
    gather_rng,
    load_optimizer,
    load_trainable_state,
    optimizer_tensors,
    read_checkpoint,
    restore_rng,
    select_best,
    trainable_state,
    write_checkpoint,
)
from livr.training.ds_setup import load_ds_config, offloads_optimizer, resolve_ds_config
from livr.training.nonfinite import check_step, refuse_nonfinite


def make_optimizer(model: torch.nn.Module, cfg: Config, ds: dict | None = None) -> torch.optim.Optimizer:
    """AdamW over livr's parameter groups (no weight decay on the latent rows). With a ZeRO config that offloads
    the optimizer, DeepSpeed's CPU Adam (the same AdamW update, vectorised on the host; DeepSpeed refuses a torch
    optimizer there unless the JSON sets "zero_force_ds_cpu_optimizer": false, which keeps torch's AdamW)."""
    from livr.model.build import param_groups

    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if ds and offloads_optimizer(ds) and ds.get("zero_force_ds_cpu_optimizer", True) is not False:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


class TorchEngine:
    """Plain torch, one process or DistributedDataParallel across ranks: accumulate, clip, AdamW.

    `micro_step(loss, …)` takes one micro-batch's share of the global-batch loss (its summed NLL / the global
    batch's token count), so the gradient of the global loss is the sum over micro-batches and ranks. DDP
    averages over ranks, hence the loss × world; its bucketed all-reduce overlaps the boundary backward, and
    the other accumulation steps run under `no_sync` (`sync(boundary)`)."""

    collective_micro = False  # DDP communicates at the boundary only: ranks may run different numbers of micro-batches

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, rank: int, world: int):
        self.model, self.opt, self.cfg, self.rank, self.world = model, opt, cfg, rank, world
        self.micro, self.accum = cfg.train.micro_batch_size, cfg.train.grad_accum
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

    def close(self) -> None:  # (plain torch and DDP are collected with the run)
        pass

    def micro_step(self, loss: torch.Tensor, boundary: bool, lr: float, step_loss: torch.Tensor | None = None) -> None:
        """At the boundary, `step_loss` (this rank's share of the step's loss) and the global gradient norm decide,
        the same on every rank, whether the step is applied (`self.last`, livr.training.nonfinite)."""
        (loss * self.world).backward()
        if not boundary:
            return
        t0 = time.perf_counter()  # host time of clipping + the optimizer (livr.training.perf; synchronised at log steps)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.last = check_step(step_loss, norm, self.world)  # the step's one host sync
        if self.last.finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.opt_s = getattr(self, "opt_s", 0.0) + time.perf_counter() - t0

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def save(self, path: str, state: dict) -> None:
        """Every rank: its RNG state goes to rank 0, which writes the checkpoint into `path`."""
        live = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        state_of = getattr(self.opt, "state", {})
        live.update({f"{n}.{k}": v for n, p in live.copy().items() for k, v in state_of.get(p, {}).items()})
        refuse_nonfinite(live, path)  # on the device, no copy: every rank holds the same replica, all refuse alike
        rngs = gather_rng(self.world, _device(self.model))
        if self.rank == 0:
            tensors, meta = optimizer_tensors(self.model, self.opt)
            write_checkpoint(path, trainable_state(self.model), tensors, meta, _with_batch(state, self), rngs)

    def load(self, path: str) -> dict:
        ck = read_checkpoint(path)
        check_batch(ck["state"], path, self.micro, self.accum, self.world)
        load_trainable_state(self.model, ck["trainable"], path)
        load_optimizer(self.model, self.opt, ck["optimizer"], path)
        restore_rng(ck["rng"], self.rank, self.world)
        return ck["state"]


def _device(model: torch.nn.Module) -> torch.device:
    return next(p.device for p in model.parameters() if p.requires_grad)


def _with_batch(state: dict, engine) -> dict:
    return {**state, "world_size": engine.world, "global_batch": engine.micro * engine.accum * engine.world}


class DeepSpeedEngine:
    """A DeepSpeed ZeRO engine around the PEFT model. The accumulation boundary is livr's (the step's last
    micro-batch, `set_gradient_accumulation_boundary`), not DeepSpeed's count of gradient_accumulation_steps:
    a packed step (`data.packing`) runs as many micro-batches as its packs."""

    collective_micro = True  # ZeRO-2 reduces at every backward, ZeRO-3 gathers at every forward: equal counts

    def __init__(self, lm, opt: torch.optim.Optimizer, ds_config: dict, rank: int, world: int):
        import deepspeed

        self.engine, self.opt, _, _ = deepspeed.initialize(model=lm.model, optimizer=opt, config=ds_config,
                                                           dist_init_required=False)
        self.rank, self.world = rank, world
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.micro, self.accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
        lm.model = self.engine  # forward goes through the engine (ZeRO-3 gathers parameters there)
        self.model = self.engine.module
        self.forward_module = self.engine

    def sync(self, boundary: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its own accumulation boundary

    def close(self) -> None:
        """DeepSpeed's `destroy()`, then what ZeRO-3 keeps in module state past it (0.19: the root module at the
        bottom of `parameter_offload.FWD_MODULE_STACK`, the coordinator in the class-wide lru_cache of its
        `__params_to_release`), so that the model and its optimizer state can be collected."""
        model = self.engine.module
        self.engine.destroy()
        if self.stage == 3:
            from deepspeed.runtime.zero import parameter_offload
            from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC

            mine = {id(m) for m in model.modules()}
            stack = parameter_offload.FWD_MODULE_STACK
            stack[:] = [m for m in stack if id(m) not in mine]
            wrapper = getattr(PPC, "_PartitionedParameterCoordinator__params_to_release", None)
            cells = [c.cell_contents for c in getattr(wrapper, "__closure__", None) or ()]  # (DeepSpeed's nvtx wrapper)
            for cached in [wrapper, *cells]:
                if hasattr(cached, "cache_clear"):
                    cached.cache_clear()

    def micro_step(self, loss: torch.Tensor, boundary: bool, lr: float, step_loss: torch.Tensor | None = None) -> None:
        """`loss`: this micro-batch's share of the global-batch loss (see TorchEngine). DeepSpeed averages
        gradients over the data-parallel ranks, so the share is scaled by the world size, not by 1/accumulation.
        A non-finite gradient is skipped by ZeRO's own overflow check on every rank; `self.last` says what it did."""
        if boundary:
            for g in self.engine.optimizer.param_groups:
                g["lr"] = lr
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        t0 = time.perf_counter()
        self.engine.step()
        if boundary:  # (livr.training.perf: the optimizer's share of the step)
            self.opt_s = getattr(self, "opt_s", 0.0) + time.perf_counter() - t0
            self.last = check_step(step_loss, self.engine.get_global_grad_norm(), self.world)
            self.last.applied = self.engine.was_step_applied()

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

    def _named(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _inner(self):
        """(the client AdamW inside the ZeRO optimizer, its flat fp32 partitions)."""
        z = self.engine.optimizer
        flats = getattr(z, "fp32_partitioned_groups_flat", None) or getattr(z, "single_partition_of_fp32_groups", None)
        return getattr(z, "optimizer", z), flats

    def _link_moments(self) -> None:
        """ZeRO-1/2 links each parameter to its slice of AdamW's moments once, after the first step of the first
        param group, when the other groups have no state yet (their slices stay empty): link them again."""
        z = self.engine.optimizer
        if hasattr(z, "_lazy_init_hp_params_optimizer_state"):
            z._hp_optimizer_states_linked = False
            z._lazy_init_hp_params_optimizer_state()

    def save(self, path: str, state: dict) -> None:
        """Every rank takes part in gathering the whole fp32 weights and AdamW moments from the ZeRO partitions
        (collectives, the same order on every rank) and its RNG state; rank 0 writes them into `path`."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        inner, flats = self._inner()
        if not flats:  # no ZeRO partitions (stage 0, fp32): the client optimizer holds whole tensors
            return TorchEngine.save(self, path, state)
        stepped = "step" in inner.state.get(flats[0], {})  # no AdamW state before the first applied step
        if stepped:  # (the same on every rank: ZeRO applies or skips a step on all of them)
            self._link_moments()
        weights, moments = {}, {}
        for n, p in self._named():
            weights[n] = safe_get_full_fp32_param(p).cpu()
            if stepped:
                for k in ("exp_avg", "exp_avg_sq"):
                    moments[f"{n}.{k}"] = safe_get_full_optimizer_state(p, k).cpu()
                moments[f"{n}.step"] = torch.as_tensor(inner.state[flats[0]]["step"], dtype=torch.float32).clone()
        refuse_nonfinite({**weights, **moments}, path)  # gathered on every rank: all refuse alike
        rngs = gather_rng(self.world, _device(self.model))
        if self.rank == 0:
            meta = {"zero_stage": self.stage, "engine_global_steps": self.engine.global_steps,
                    "optimizer": type(inner).__name__}
            write_checkpoint(path, weights, moments, meta, _with_batch(state, self), rngs)

    def load(self, path: str) -> dict:
        """Every rank reads the verified checkpoint and keeps its own partitions of it (re-sharding)."""
        inner, flats = self._inner()
        if not flats:
            return TorchEngine.load(self, path)
        ck = read_checkpoint(path)
        check_batch(ck["state"], path, self.micro, self.accum, self.world)
        with gathered(self, modifier_rank=0):  # the module's (bf16/fp32) weights; ZeRO-3 re-partitions rank 0's
            load_trainable_state(self.model, ck["trainable"], path)
        opt = ck["optimizer"]
        named = self._named()
        if not opt:  # written before the first applied step (e.g. a non-finite first step): AdamW starts fresh
            return self._loaded(ck, named, moments=False)
        if not named or f"{named[0][0]}.step" not in opt:
            raise CheckpointError(f"checkpoint {path} has no optimizer state for {named[0][0] if named else '?'}")
        step = opt[f"{named[0][0]}.step"]
        if type(inner).__name__ == "DeepSpeedCPUAdam":  # its kernel takes the step as a Python int
            step = int(step.item())
        for flat in flats:  # AdamW's state is created at its first step: create it, then fill it
            inner.state[flat] = {"step": step if isinstance(step, int) else step.clone(), "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        self._link_moments()
        return self._loaded(ck, named, moments=True)

    def _loaded(self, ck: dict, named: list, moments: bool) -> dict:
        """The checkpoint's fp32 weights (and AdamW moments) into this rank's partitions; DeepSpeed's step count
        and this rank's RNG restored."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        dev = _device(self.model)
        for n, p in named:
            safe_set_full_fp32_param(p, ck["trainable"][n].to(dev, torch.float32))
            for k in ("exp_avg", "exp_avg_sq") if moments else ():
                safe_set_full_optimizer_state(p, ck["optimizer"][f"{n}.{k}"].to(dev, torch.float32), k)
        self.engine.global_steps = ck["opt_meta"].get("engine_global_steps", ck["state"]["global_step"])
        self.engine.global_samples = self.engine.global_steps * self.micro * self.accum * self.world
        restore_rng(ck["rng"], self.rank, self.world)
        return ck["state"]


def make_engine(lm, cfg: Config, rank: int, world: int):
    """The engine and its optimizer (`make_optimizer`) for the run's config."""
    if not cfg.distributed.deepspeed:
        return TorchEngine(lm.model, make_optimizer(lm.model, cfg), cfg, rank, world)
    ds = resolve_ds_config(load_ds_config(cfg.distributed.deepspeed), cfg, world, lm.dtype)
    return DeepSpeedEngine(lm, make_optimizer(lm.model, cfg, ds), ds, rank, world)


def gathered(engine, modifier_rank: int | None = None, with_embeddings: bool = False):
    """Under ZeRO-3, a context in which the trainable parameters (and optionally the input embedding
    table) are whole, for saving or loading them; a no-op otherwise."""
    if getattr(engine, "stage", 0) != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for p in engine.model.parameters() if p.requires_grad]
    if with_embeddings:  # the input table and the output head (an untied head's latent rows are saved)
        tables = [engine.model.get_input_embeddings(), engine.model.get_output_embeddings()]
        params += [p for t in tables if t is not None for p in t.parameters() if not p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def restore_best(engine, ckpt_dir: str, state: dict, rank: int, world: int) -> None:
    """train.select=best: rank 0 picks the selection (`select_best`: the verified best, or its fallback with a
    warning) and loads it; every rank then holds those weights (ZeRO-3 re-partitions, others get a broadcast)."""
    tensors = select_best(ckpt_dir, state) if rank == 0 else None
    with gathered(engine, modifier_rank=0):
        if tensors is not None:
            load_trainable_state(engine.model, tensors, os.path.join(ckpt_dir, "best.safetensors"))
    if world > 1 and getattr(engine, "stage", 0) != 3:
        with torch.no_grad():
            for p in engine.model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, 0)
