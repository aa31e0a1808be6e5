"""The config tree: one dataclass per component (model, latents, LoRA, data, training, optimizer, evaluation,
distributed, search, tracking) under `Config`, with their defaults; `ConfigError` names a bad key."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


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
