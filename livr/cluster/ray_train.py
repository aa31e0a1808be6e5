"""Ray Train around the one training function: N workers each run `train_worker(cfg)`.

gloo on CPU, nccl on GPU; DeepSpeed (when `distributed.deepspeed` names a ZeRO JSON) reuses Ray's
process group. Checkpoints are reported with `ray.train.report` (rank 0 writes the gathered safetensors checkpoint); after a worker
dies Ray restarts the group (`FailureConfig(max_failures)`) and `train_worker` continues from
`ray.train.get_checkpoint()`; re-running the same command (same run name and storage) resumes a stopped
run. Config errors are raised before any worker starts.
"""
from __future__ import annotations

import copy
import json
import os

from livr.config import Config, ConfigError, from_dict, to_dict
from livr.training.runlock import ray_safe_name

_WORKER_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "LIVR_QUIET", "DS_ACCELERATOR",
               "LIVR_FAIL_AT_STEP", "LIVR_FAIL_RANK", "LIVR_FAIL_MODE", "LIVR_FAIL_MARKER", "TORCH_EXTENSIONS_DIR",
               "LIVR_RUN_LOCK_HELD", "LIVR_TUNE_INTERRUPT_AT_REPORT", "LIVR_NAN_AT_STEPS", "LIVR_NAN_RANK")


def check_config(cfg: Config) -> None:
    """Errors a user can fix, found before Ray starts any worker."""
    d = cfg.distributed
    if d.num_workers < 1:
        raise ConfigError(f"config: distributed.num_workers={d.num_workers}: Ray Train needs >= 1 worker")
    if d.deepspeed:
        from livr.model.vision_cache import check_zero_stage
        from livr.training.ds_setup import check_zero3, load_ds_config

        ds = load_ds_config(d.deepspeed)  # parses, and the ZeRO stage exists
        check_zero_stage(cfg, ds.get("zero_optimization", {}).get("stage", 0))
        check_zero3(cfg, ds)
    if not d.use_gpu:  # (GPU workers check their own kernels: the driver may have no GPU or flash-attn)
        import torch

        from livr.model.attention import check

        check(cfg, torch.device("cpu"), training=True)


def init_ray(cfg: Config) -> None:
    """Connect to `distributed.address` / RAY_ADDRESS, or start a local cluster, unless already connected."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    if not cfg.distributed.use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # a worker's print once (the patch tees it to a logger too)
    address = cfg.distributed.address or os.environ.get("RAY_ADDRESS")
    from livr.utils.console import WORKER_SETUP

    runtime_env = {"env_vars": env, "worker_process_setup_hook": WORKER_SETUP}  # known noise filtered in workers too
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), object_store_memory=100 * 1024**2, include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=True)


def check_capacity(cfg: Config) -> None:
    """More workers than the cluster can ever place is a clear error, not a hang."""
    import ray

    d = cfg.distributed
    have = ray.cluster_resources()
    need = {"CPU": d.num_workers * d.cpus_per_worker, "GPU": d.num_workers * (d.gpus_per_worker or (1 if d.use_gpu else 0))}
    for res, amount in need.items():
        if amount > have.get(res, 0):
            raise ConfigError(f"config: distributed.num_workers={d.num_workers} needs {amount:g} {res} in all but the "
                              f"cluster has {have.get(res, 0):g}")


def check_storage(cfg: Config) -> None:
    """A run across several nodes needs checkpoint storage every node sees (Ray Train's workers upload there and
    the driver and restarted workers read back). One node cannot tell whether a local path is shared, so: an empty
    distributed.storage_path is refused when the cluster has more than one alive node, a local path unless
    distributed.storage_shared=true; a URI (s3://, gs://, …, not file://) is accepted. Checked before any worker."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes <= 1:
        return
    d = cfg.distributed
    if not d.storage_path:
        raise ConfigError(f"config: distributed.storage_path is empty but the Ray cluster has {nodes} nodes: "
                          "checkpoints would stay on each node's own disk; set it to s3://…, gs://…, or a path every "
                          "node mounts together with distributed.storage_shared=true")
    if ("://" not in d.storage_path or d.storage_path.startswith("file://")) and not d.storage_shared:
        raise ConfigError(f"config: distributed.storage_path={d.storage_path!r} is a local path and the Ray cluster has "
                          f"{nodes} nodes: if every node mounts it (NFS, Lustre), set distributed.storage_shared=true; "
                          "else use s3://… or gs://…")


def worker_error(e: BaseException) -> BaseException | None:
    """The lowest-ranked worker's livr error (config, data, checkpoint, write, non-finite: each one line) inside Ray
    Train's failure, else None."""
    from livr.data.tasks import DataError
    from livr.training.checkpoint import CheckpointError
    from livr.training.nonfinite import NonFiniteError
    from livr.utils.atomic import WriteError

    kinds = (ConfigError, DataError, CheckpointError, WriteError, NonFiniteError)
    failures = getattr(e, "worker_failures", None) or {}
    for rank in sorted(failures):
        err, depth = failures[rank], 0
        while err is not None and depth < 8:
            cause = getattr(err, "cause", None)  # a RayTaskError: the worker's own exception
            if isinstance(cause, kinds):
                return cause
            if isinstance(err, kinds) and cause is None:
                return err
            err, depth = cause or err.__cause__, depth + 1
    return None


def absolute_paths(cfg: Config) -> Config:
    """Workers run in Ray's own working directory: resolve every relative path on the driver."""
    from livr.tracking.tracker import artifact_location, tracking_uri

    cfg.output_dir = os.path.abspath(os.path.expanduser(cfg.output_dir))
    cfg.model.cache_dir = os.path.abspath(os.path.expanduser(cfg.model.cache_dir))
    cfg.data.cache_dir = os.path.abspath(os.path.expanduser(cfg.data.cache_dir))
    if os.path.exists(cfg.model.backbone):
        cfg.model.backbone = os.path.abspath(cfg.model.backbone)
    if cfg.data.source not in ("synthetic", "hub"):
        cfg.data.source = os.path.abspath(cfg.data.source)
    if cfg.data.test_source not in ("", "synthetic", "hub"):
        cfg.data.test_source = os.path.abspath(cfg.data.test_source)
    if cfg.distributed.deepspeed:
        cfg.distributed.deepspeed = os.path.abspath(cfg.distributed.deepspeed)
    cfg.tracking.uri, cfg.tracking.artifact_location = tracking_uri(cfg), artifact_location(cfg)
    return cfg


def drop_unregistered_checkpoints(storage) -> list[str]:
    """Delete the `checkpoint_*` dirs in the run's Ray storage that Ray's checkpoint manager does not list.

    A checkpoint is uploaded by the workers before the controller registers it; when a worker dies with a
    report in flight (or the driver is killed), the upload stays in the storage but is never registered, so
    Ray never counts it against `num_to_keep` nor deletes it. Called on rank 0 when a worker group starts
    (after a restart or on a resume no report is in flight then); returns the deleted names."""
    import pyarrow.fs

    fs, root = storage.storage_filesystem, storage.experiment_fs_path
    keep = set()
    try:
        with fs.open_input_stream(storage.checkpoint_manager_snapshot_path) as f:
            snap = json.loads(f.readall())
        results = [*snap.get("checkpoint_results", []), *snap.get("pending_training_results", []),
                   snap.get("latest_checkpoint_result") or {}]
        keep = {r.get("checkpoint_dir_name") for r in results}
    except FileNotFoundError:
        pass  # nothing registered yet: every checkpoint dir here is an orphan
    dropped = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_") \
                and info.base_name not in keep:
            fs.delete_dir(info.path)
            dropped.append(info.base_name)
    if dropped:
        print(f"[livr] removed {len(dropped)} unregistered Ray checkpoint(s) left by a failure: {', '.join(dropped)}",
              flush=True)
    return dropped


def _worker_loop(config: dict) -> None:
    import ray.train

    from livr.training.train import train_worker

    cfg = from_dict(config)
    if cfg.model.device in ("auto", "cuda") and cfg.distributed.use_gpu:
        import ray.train.torch
        import torch

        if torch.cuda.is_available():  # Ray's device for this worker (its CUDA_VISIBLE_DEVICES), not LOCAL_RANK's
            cfg.model.device = str(ray.train.torch.get_device())
    if ray.train.get_context().get_world_rank() == 0:
        drop_unregistered_checkpoints(ray.train.get_context().get_storage())
    ckpt = ray.train.get_checkpoint()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        from ray.train import Checkpoint

        has = checkpoint_dir and os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if has else None)

    if ckpt is not None:
        with ckpt.as_directory() as path:
            train_worker(cfg, report=report, resume_from=path)
    else:
        train_worker(cfg, report=report)


def make_trainer(cfg: Config, *, name: str | None = None, storage_path: str | None = None, callbacks: list | None = None):
    """A TorchTrainer of `cfg.distributed.num_workers` workers running `train_worker(cfg)`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = absolute_paths(copy.deepcopy(cfg))
    d = cfg.distributed
    resources = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        resources["GPU"] = d.gpus_per_worker or 1
    storage = storage_path or d.storage_path or os.path.abspath(os.path.join(cfg.output_dir, "ray"))
    return TorchTrainer(
        _worker_loop,
        train_loop_config=to_dict(cfg),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu, resources_per_worker=resources,
                                     placement_strategy=d.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo", timeout_s=d.timeout_s),
        run_config=RunConfig(name=ray_safe_name(name or cfg.name), storage_path=storage, callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=d.num_to_keep),
                             failure_config=FailureConfig(max_failures=d.max_failures)),
    )


def run_distributed(cfg: Config) -> dict:
    """`livr train` with distributed.num_workers > 0: fit the trainer, return the run's final metrics."""
    check_config(cfg)
    absolute_paths(cfg)
    if cfg.distributed.deepspeed and not cfg.distributed.use_gpu:
        from livr.training.ds_setup import prebuild_cpu_comm_op

        prebuild_cpu_comm_op()
    import ray

    from livr.training.runlock import check_resume, run_lock

    with run_lock(cfg.run_dir):  # the driver owns the run; the workers get LIVR_RUN_LOCK_HELD (livr.training.runlock)
        check_resume(cfg)
        from livr.training.run_status import finished_message, finished_run

        done = finished_run(cfg)
        if done is not None:  # nothing to resume: no worker starts, nothing is evaluated again
            print(finished_message(cfg), flush=True)
            return {**done, "ray_checkpoint": None}
        started_ray = not ray.is_initialized()
        init_ray(cfg)
        check_capacity(cfg)
        check_storage(cfg)
        try:
            result = make_trainer(cfg).fit()
        except Exception as e:  # a worker's one-line livr error stays one line on the driver
            err = worker_error(e)
            if err is None:
                raise
            raise err from None
        finally:
            if started_ray:  # the workers' last log lines reach the console now, before the run's summary
                ray.shutdown()
    path = os.path.join(cfg.run_dir, "final_metrics.json")
    final = {}
    if os.path.exists(path):
        with open(path) as f:
            final = json.load(f)
    final["ray_checkpoint"] = result.checkpoint.path if result.checkpoint else None
    return final
