"""Validation of a Config: every error one line naming the key and value (`validate`, run by `from_dict`);
checks owned by higher layers are registered with `register_check`; paths are checked by `check_paths`."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import unicodedata
from collections.abc import Callable
from typing import Any

from livr.config.schema import Config, ConfigError, DistributedConfig, LoraConfig, OptimConfig

# Checks that need knowledge owned by a layer above the config (task names: livr.data.tasks; packing:
# livr.data.packing; a declared backbone family: livr.backbones.declared) are registered by that layer when it is
# imported, and `validate` runs them. Importing livr.data and livr.backbones (as every entry point does) registers
# them all; the config itself imports nothing of livr.
CHECKS: dict[str, Callable[[Config], None]] = {}


def register_check(name: str, check: Callable[[Config], None]) -> None:
    """`check(cfg)` raises a one-line ConfigError naming the key; run by `validate` after the config's own checks."""
    CHECKS[name] = check


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config: {key}={value!r}: {why}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(key, value, f"must be one of {', '.join(map(str, allowed))}")


def _check_name(name: str) -> None:
    """The run's directory name: one safe path segment (unicode letters allowed; Ray uses runlock.ray_safe_name)."""
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")]
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name or bad:
        _fail("name", name, "must be one directory name: not empty, no '/' or '\\', not starting with '.', "
              "no control characters")
    if len(name.encode("utf-8")) > 200:
        _fail("name", name, "is longer than 200 bytes")


def _non_finite(value: Any, key: str) -> tuple[str, float] | None:
    """(dotted key, value) of the first nan/inf float in a config subtree, else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key.lstrip("."), value)
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{key}.{k}" if isinstance(k, str) else f"{key}[{k}]")
        if found:
            return found
    return None


def _check_device(device: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", device):
        _fail("model.device", device, "must be auto, cpu, cuda, cuda:N or mps")
    if device == "mps":
        import torch

        if not torch.backends.mps.is_built():
            _fail("model.device", device, "this torch build has no MPS support")


def _check_distributed(d: DistributedConfig) -> None:
    for key, low in (("num_workers", 0), ("cpus_per_worker", 1), ("gpus_per_worker", 0), ("max_failures", -1),
                     ("num_to_keep", 1), ("checkpoint_every", 0), ("timeout_s", 1)):
        if getattr(d, key) < low:
            _fail(f"distributed.{key}", getattr(d, key), f"must be >= {low}" + (" (-1 = unlimited)" if low == -1 else ""))
    _one_of("distributed.placement_strategy", d.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


def _check_optim(o: OptimConfig) -> None:
    if o.lr <= 0:
        _fail("optim.lr", o.lr, "must be > 0")
    if o.eps <= 0:
        _fail("optim.eps", o.eps, "must be > 0")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", o.weight_decay, "must be >= 0")
    for key in ("beta1", "beta2", "warmup_ratio"):
        if not 0 <= getattr(o, key) < 1:
            _fail(f"optim.{key}", getattr(o, key), "must be in [0, 1)")
    if not 0 <= o.min_lr_ratio <= 1:
        _fail("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")


def _check_expert_targets(lora: LoraConfig) -> None:
    for name in lora.expert_targets:
        _one_of("lora.expert_targets", name, ("gate_up_proj", "down_proj"))
    if lora.expert_targets and lora.dropout:
        _fail("lora.expert_targets", lora.expert_targets, f"PEFT's LoRA on 3-D expert weights takes no dropout; set "
              f"lora.dropout=0 (is {lora.dropout})")


def looks_like_path(backbone: str) -> bool:
    """A local path rather than a preset name or hub id (`org/name`, one '/'): starts with '/', '.' or '~', holds a
    backslash, or has more than one '/'."""
    return backbone.startswith(("/", ".", "~")) or "\\" in backbone or backbone.count("/") > 1


def check_paths(cfg: Config) -> Config:
    """Local paths the run needs, checked where the config is loaded (`load_config`, i.e. the launching process),
    never in `from_dict` (Ray workers, Tune trials): a `model.backbone` that looks like a path must be a directory."""
    b = cfg.model.backbone
    if looks_like_path(b) and not os.path.isdir(os.path.expanduser(b)):
        _fail("model.backbone", b, "no such directory (give a model directory, a preset name such as "
              "tiny-qwen2.5-vl, or a hub id org/name)")
    return cfg


def check_data_paths(cfg: Config) -> Config:
    """Where a launch (`livr train`, `livr tune`, `livr eval`) reads its data, checked before anything loads or is
    written: a `data.source` / `data.test_source` that is neither synthetic nor hub must be a directory. (Not in
    `load_config`: `livr plan` and `livr config show` work on configs whose data is elsewhere.)"""
    for key in ("source", "test_source"):
        src = getattr(cfg.data, key)
        if src and src not in ("synthetic", "hub") and not os.path.isdir(os.path.expanduser(src)):
            _fail(f"data.{key}", src, "no such directory (give synthetic for procedural tasks, hub for "
                  "BLINK-Benchmark/BLINK, or a directory in BLINK's schema)")
    return cfg


def validate(cfg: Config) -> Config:
    """Every value checked, cheaply and without touching the filesystem (see `check_paths` for that); the
    first problem is a one-line ConfigError naming the key."""
    _check_name(cfg.name)
    bad = _non_finite(cfg, "")
    if bad:
        _fail(*bad, "must be a finite number (not nan or inf)")
    if not cfg.model.backbone.strip():
        _fail("model.backbone", cfg.model.backbone, "must name a preset, a hub id or a model directory")
    _check_device(cfg.model.device)
    _one_of("model.dtype", cfg.model.dtype, ("auto", "float32", "bfloat16", "float16"))
    _one_of("model.attn_implementation", cfg.model.attn_implementation, ("auto", "sdpa", "eager", "flex_attention"))
    _one_of("model.attn_implementation_vision", cfg.model.attn_implementation_vision,
            ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"))
    if cfg.model.attn_implementation_stage2:
        _one_of("model.attn_implementation_stage2", cfg.model.attn_implementation_stage2,
                ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"))
    if cfg.model.vision_cache_mib < 0:
        _fail("model.vision_cache_mib", cfg.model.vision_cache_mib, "must be >= 0")
    if cfg.model.num_layers < 0:
        _fail("model.num_layers", cfg.model.num_layers, "must be >= 0 (0 = the checkpoint's own depth)")
    _one_of("train.mode", cfg.train.mode, ("livr", "sft"))
    _one_of("train.select", cfg.train.select, ("best", "last"))
    _one_of("train.nonfinite", cfg.train.nonfinite, ("skip", "stop"))
    if cfg.train.max_nonfinite_skips < 0:
        _fail("train.max_nonfinite_skips", cfg.train.max_nonfinite_skips, "must be >= 0 (0 = stop at the first)")
    _one_of("latents.init", cfg.latents.init, ("random", "mean"))
    _one_of("data.answer_format", cfg.data.answer_format, ("letter", "paren"))
    if cfg.latents.num_latents < 0:
        _fail("latents.num_latents", cfg.latents.num_latents, "the number of latent tokens K must be >= 0")
    for key in ("stage1_epochs", "stage2_epochs", "sft_epochs", "stage1_steps", "stage2_steps", "sft_steps"):
        if getattr(cfg.train, key) < 0:
            _fail(f"train.{key}", getattr(cfg.train, key), "must be >= 0")
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        if getattr(cfg.train, key) < 1:
            _fail(f"train.{key}", getattr(cfg.train, key), "must be >= 1")
    if cfg.train.max_grad_norm <= 0:
        _fail("train.max_grad_norm", cfg.train.max_grad_norm, "must be > 0")
    _check_optim(cfg.optim)
    for key in ("r", "alpha"):
        if getattr(cfg.lora, key) < 1:
            _fail(f"lora.{key}", getattr(cfg.lora, key), "must be >= 1")
    if not 0 <= cfg.lora.dropout < 1:
        _fail("lora.dropout", cfg.lora.dropout, "must be in [0, 1)")
    _check_expert_targets(cfg.lora)
    if not cfg.data.tasks:
        _fail("data.tasks", cfg.data.tasks, "needs at least one task")
    if cfg.data.cache_mib < 0:
        _fail("data.cache_mib", cfg.data.cache_mib, "must be >= 0")
    if cfg.data.num_workers < -1:
        _fail("data.num_workers", cfg.data.num_workers, "must be >= 0, or -1 for one per spare core")
    for key in ("max_pixels", "min_pixels"):
        if getattr(cfg.data, key) < 0:
            _fail(f"data.{key}", getattr(cfg.data, key), "must be >= 0 (0 = the checkpoint's own setting)")
    if 0 < cfg.data.max_pixels < cfg.data.min_pixels:
        _fail("data.max_pixels", cfg.data.max_pixels, f"is below data.min_pixels={cfg.data.min_pixels}")
    for key in ("train_size", "val_size", "test_size"):
        if getattr(cfg.data, key) < 0:
            _fail(f"data.{key}", getattr(cfg.data, key), "must be >= 0")
    if cfg.eval.batch_size < 1 or cfg.eval.max_new_tokens < 1:
        _fail("eval.batch_size", cfg.eval.batch_size, "batch_size and max_new_tokens must be >= 1")
    for split in cfg.eval.splits:
        _one_of("eval.splits", split, ("train", "val", "test"))
    _one_of("eval.parser", cfg.eval.parser, ("blink", "lenient", "match"))
    _check_distributed(cfg.distributed)
    if cfg.tracking.system_metrics_interval_s <= 0:
        _fail("tracking.system_metrics_interval_s", cfg.tracking.system_metrics_interval_s, "must be > 0 (seconds)")
    _one_of("tune.mode", cfg.tune.mode, ("max", "min"))
    _one_of("tune.scheduler", cfg.tune.scheduler, ("asha", "fifo"))
    _one_of("tune.searcher", cfg.tune.searcher, ("random", "optuna"))
    for check in CHECKS.values():  # the layers above: task names, a declared family, packing
        check(cfg)
    if cfg.train.mode == "sft":
        cfg.latents.num_latents = 0  # the SFT baseline: the same pipeline, no latents, plain mask
    return cfg
