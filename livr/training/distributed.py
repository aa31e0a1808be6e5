"""The process group of a training process: who this rank is, joining (or making) the group, and leaving it.

`setup_distributed` joins the group the launcher describes (RANK/WORLD_SIZE, or one already initialised, e.g. Ray
Train's), or makes a one-rank group for DeepSpeed in one process. `teardown_distributed` destroys the groups in the
process that made them, before it exits (livr's entry points call it; Ray Train tears down its own)."""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from livr.config import Config

_SET_HERE: list[str] = []  # the environment variables setup_distributed set for its one-process group


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int


def setup_distributed(cfg: Config) -> Context:
    """Rank/world from the environment; joins (or reuses) the process group when world > 1, or makes a one-rank
    group for DeepSpeed in one process (the single-GPU mode: no launcher, no MPI). On CUDA the rank's device is
    Ray Train's (`ray.train.torch.get_device()`, put in model.device by livr.cluster.ray_train) or cuda:LOCAL_RANK, set as the current device before anything
    touches the GPU, so object collectives and NCCL never land on another rank's GPU. Every process group gets
    `distributed.timeout_s`."""
    from datetime import timedelta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg.model.device.startswith(("auto", "cuda")) and torch.cuda.is_available()
    if cuda:
        if cfg.model.device in ("auto", "cuda"):  # (Ray Train's workers come with their device set: livr.cluster.ray_train)
            cfg.model.device = f"cuda:{local}"
        torch.cuda.set_device(torch.device(cfg.model.device))
    timeout = timedelta(seconds=cfg.distributed.timeout_s)
    backend = "nccl" if cuda and (cfg.distributed.use_gpu or world == 1) else "gloo"
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1:
        dist.init_process_group(backend, timeout=timeout)
    elif cfg.distributed.deepspeed:  # DeepSpeed needs a process group; without one it falls back to MPI discovery
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            if key not in os.environ:  # (teardown_distributed takes back what was set here: a later group, a new port)
                os.environ[key] = value
                _SET_HERE.append(key)
        dist.init_process_group(backend, rank=0, world_size=1, timeout=timeout)
    return Context(rank, world, local)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown_distributed() -> None:
    """Destroy this process's process groups now, while Python runs, rather than at interpreter exit.

    Left to exit, a group that something still references (DeepSpeed keeps its world group in
    `deepspeed.utils.groups`; an engine in a reference cycle keeps its DDP reducer's) is finalised with gloo's
    threads still running, and the process can die with SIGABRT ("terminate called without an active exception"):
    seen in CI and in 2 of 23 two-rank runs with a ZeRO-2 engine here; 0 of 85 with this teardown (2026-12-07). DeepSpeed's own
    `deepspeed.comm.destroy_process_group` also drops its references; torch's destroys every group."""
    while _SET_HERE:
        os.environ.pop(_SET_HERE.pop(), None)
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # engines and DDP modules left in reference cycles: their groups go with them
    ds = sys.modules.get("deepspeed.comm.comm")
    if ds is not None and getattr(ds, "cdb", None) is not None and ds.cdb.is_initialized():
        ds.destroy_process_group()
    else:
        dist.destroy_process_group()
