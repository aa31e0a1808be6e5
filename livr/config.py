"""One typed config tree for a livr run: dataclasses, loaded from YAML, overridden by `key=value`.

    cfg = load_config("configs/demo.yaml", ["latents.num_latents=8", "optim.lr=3e-4"])

Every error is one line naming the offending key and value (`ConfigError`). A run saves its resolved
config (`save_config`) and that file alone reproduces the run.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    backbone: str = "tiny-qwen2.5-vl"  # tiny preset name, hub id or local directory
    cache_dir: str = "~/.cache/livr/backbones"  # where tiny presets are materialised
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # Stage 1: auto (flex_attention on CUDA, sdpa on CPU) | sdpa | eager | flex_attention
    attn_implementation_stage2: str = ""  # Stage 2 / SFT / inference; "" = same as Stage 1 (also flash_attention_2/3)
    attn_implementation_vision: str = "auto"  # the vision tower: auto (flash_attention_2 on CUDA if installed, else sdpa)
    gradient_checkpointing: bool = False
    cache_vision: bool = False  # compute each image's frozen vision features once, reuse them (livr/model/vision_cache.py)
    vision_cache_mib: int = 4096  # host memory for cached features per process; beyond it: vision_cache_dir
    vision_cache_dir: str = ""  # where features beyond vision_cache_mib go (one file per image); "" = recompute them
    trust_remote_code: bool = False
    num_layers: int = 0  # keep the first N decoder layers and min(N, depth) vision blocks; 0 = the checkpoint's depth
    family: dict = field(default_factory=dict)  # a family declared here for a VLM livr has no module for (docs/backbones.md)


@dataclass
class LatentConfig:
    num_latents: int = 16  # K; 0 = no latent tokens (the SFT baseline)
    init: str = "random"  # random (normal, std of the existing rows) | mean (mean of existing rows)
    init_seed: int = 0


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # LoRA on a MoE model's fused 3-D expert weights (gate_up_proj, down_proj; PEFT target_parameters; needs
    # dropout 0); [] = off. The router never trains. livr/backbones/experts.py
    expert_targets: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | hub | a local directory in BLINK's schema
    test_source: str = ""  # where the test split loads from: "" = data.source; e.g. hub (test_split val = BLINK val)
    tasks: list[str] = field(default_factory=lambda: ["Counting"])
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    train_size: int = 1000  # synthetic: examples generated; hub/local: limit (0 = all)
    val_size: int = 250
    test_size: int = 250
    image_size: int = 112  # synthetic images
    cache_dir: str = "~/.cache/livr/data"  # where synthetic data is materialised
    answer_format: str = "letter"  # letter ("B") | paren ("(B)")
    seed: int = 42
    options: dict = field(default_factory=dict)  # per-generator options, e.g. {max_count: 4}
    num_workers: int = -1  # DataLoader processes per rank that decode + encode rows; -1 = one per spare core (<= 4)
    cache_mib: int = 1024  # encoded rows kept per loader process for the next epochs (small data); 0 = none
    max_pixels: int = 0  # cap per image (Qwen-style processors: longest_edge in pixels); 0 = the checkpoint's own
    min_pixels: int = 0  # floor per image; 0 = the checkpoint's own
    packing: bool = False  # pack each step's examples into few rows (attention and the bottleneck per example)
    max_tokens: int = 16384  # with packing: tokens per packed micro-batch (an example longer than this: alone)


@dataclass
class TrainConfig:
    mode: str = "livr"  # livr (Stage 1 bottleneck, then Stage 2) | sft (plain causal, K = 0)
    stage1_epochs: float = 4
    stage2_epochs: float = 6
    sft_epochs: float = 10
    stage1_steps: int = 0  # > 0 overrides the epochs of that stage (optimizer steps)
    stage2_steps: int = 0
    sft_steps: int = 0
    micro_batch_size: int = 1
    grad_accum: int = 8
    max_grad_norm: float = 1.0
    nonfinite: str = "skip"  # a step with a nan/inf loss or gradient norm: skip (not applied) | stop (the run stops)
    max_nonfinite_skips: int = 10  # skip: the run stops after more consecutive skipped steps than this
    select: str = "best"  # best (validation accuracy) | last
    eval_every_epoch: bool = True
    log_every: int = 10
    seed: int = 42
    resume: bool = True  # continue from <run_dir>/checkpoints/last if present
    device_peak_tflops: float = 0.0  # the device's peak for perf/mfu; 0 = the GPU table (livr/model/flops.py), none on CPU


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01  # never on the latent embedding rows
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.05  # linear warm-up then cosine, restarted for each stage
    min_lr_ratio: float = 0.0


@dataclass
class EvalConfig:
    batch_size: int = 8
    max_new_tokens: int = 8
    bottleneck: bool = False  # evaluate under the Stage-1 mask (the paper's analysis)
    splits: list[str] = field(default_factory=lambda: ["test"])  # of train | val | test (the data.*_split names)
    zero_shot: bool = False  # also evaluate the untrained backbone
    # answer scoring: blink (BLINK's official rule, exactly) | match (BLINK's rule, then a judge-free match against
    # the row's choices: approximates BLINK's published, judged numbers) | lenient (finds "(X)" anywhere)
    parser: str = "blink"
    group_by_length: bool = True  # generation batches of rows of similar prompt length (less padding per prefill)


@dataclass
class DistributedConfig:
    num_workers: int = 0  # 0 = this process (single-GPU mode); N = N Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0
    deepspeed: str = ""  # path to a ZeRO JSON (deepspeed_configs/zero2.json); "" = plain torch
    address: str = ""  # Ray cluster address; "" = RAY_ADDRESS or a local cluster
    storage_path: str = ""  # shared storage for checkpoints (NFS path or s3://, gs://); required across nodes
    storage_shared: bool = False  # storage_path is a local path every node mounts (NFS, Lustre): allowed across nodes
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    max_failures: int = 0  # worker-group restarts after a failure; -1 = unlimited
    num_to_keep: int = 2
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = every epoch
    timeout_s: int = 7200  # process-group timeout (collectives, barriers), e.g. while local rank 0 downloads the backbone


@dataclass
class TuneConfig:
    search_space: dict = field(
        default_factory=lambda: {
            "latents.num_latents": {"grid": [4, 8, 16, 32]},
            "optim.lr": {"loguniform": [1e-5, 5e-4]},
        }
    )
    num_samples: int = 1
    max_concurrent_trials: int = 1
    metric: str = "val_accuracy"
    mode: str = "max"
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 1  # ASHA: epochs (reports) before a trial can be stopped
    reduction_factor: float = 2  # ASHA: keep the top 1/reduction_factor at each rung
    searcher: str = "random"  # random | optuna
    workers_per_trial: int = 0  # 0 = in-process trial; N = a TorchTrainer with N workers


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = sqlite:///<cwd>/mlflow.db ; any MLflow tracking URI (http://127.0.0.1:5000)
    artifact_location: str = ""  # "" = <cwd>/mlartifacts, or the server's default for an http(s) uri (at experiment creation)
    experiment: str = "livr"
    run_name: str = ""  # "" = the run's name
    system_metrics: bool = False  # MLflow's system/* metrics (CPU, memory, disk, network; GPU with nvidia-ml-py), rank 0
    system_metrics_interval_s: float = 10.0  # seconds between two samples of them


@dataclass
class Config:
    name: str = "livr-run"
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    latents: LatentConfig = field(default_factory=LatentConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(os.path.expanduser(self.output_dir), self.name)


# ----------------------------------------------------------------------------- building from dicts
def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # a single value given for a list
            value = [value]
        if isinstance(value, (list, tuple)):
            return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif tp is dict and isinstance(value, dict):
        return dict(value)
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config: {key} must be {name}, got {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config: {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(
                f"config: unknown key '{prefix}{key}' (valid under {prefix.rstrip('.') or 'the root'}: {', '.join(names)})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(prefix + key, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config: '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def _declared_type(dotted: str) -> Any:
    """The declared type of a dotted Config key (`train.mode` -> str), or None for an unknown key."""
    cls: Any = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(part)
    return cls


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=1", "c=[x, y]"]` -> nested dict; values are parsed as YAML scalars/lists, except for a str-typed key,
    which keeps the text as typed (`name=off`, `name=null`, `name=1e3`; a quoted YAML string loses its quotes)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config: override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if _declared_type(key.strip()) is str and not isinstance(value, str):
            value = raw  # YAML 1.1 would make off/yes a bool, null None, 0x10 an int, 1.50 the float 1.5
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        replace = k == "search_space"  # a given search space replaces the default one (no merged dimensions)
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and not replace else v
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """A validated Config from a (partial) dict. Touches no file: Ray workers and Tune trials build theirs here."""
    cfg = _build(Config, _merge(to_dict(Config()), data))
    return validate(cfg)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config: file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a mapping at the top level")
    return check_paths(from_dict(_merge(data, parse_overrides(overrides or []))))


def save_config(cfg: Config, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": v}; used for MLflow params and search-space keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not (prefix + k).endswith(("options", "search_space")):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ----------------------------------------------------------------------------- validation
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
