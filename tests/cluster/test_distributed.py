"""Ray Train + DeepSpeed over gloo on CPU: real clusters, real engines; every cluster is shut down."""
import json
import os

import pytest
import torch
from conftest import tiny_overrides, zero3_json

from livr.config import ConfigError, load_config

pytestmark = pytest.mark.slow  # real clusters / servers / whole runs: not in the fast tier

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LIVR_QUIET": "1",
       "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test clusters only
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _cfg(backbone_cache, data_cache, tmp_path, **extra):
    extra = {"train.stage1_steps": 2, "train.stage2_steps": 2, "data.train_size": 16, "train.micro_batch_size": 2,
             "train.grad_accum": 1, "distributed.num_workers": 2, "optim.lr": 1e-2, **extra}
    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **extra))


@pytest.fixture(scope="module")
def _local_cluster():
    """The module's shared local cluster (its head node id once started); shut down at the module's end."""
    import ray

    held = {}
    try:
        yield held
    finally:
        ray.shutdown()


@pytest.fixture
def ray_local(_local_cluster):
    """A local 2-CPU cluster, shared by the tests that use it one after another (the first starts it); a test that
    starts a cluster of its own shuts it down first (_own_cluster), and the next user starts it again."""
    import ray

    if ray.is_initialized() and _local_cluster.get("node") != ray.get_runtime_context().get_node_id():
        ray.shutdown()  # (not the shared one)
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False,
                 runtime_env={"env_vars": ENV})
        _local_cluster["node"] = ray.get_runtime_context().get_node_id()
    return ray


def _own_cluster() -> None:
    """Before a test starts its own cluster (or connects to two_raylets): the shared one (if up) is shut down."""
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def two_raylets():
    """Two raylets (ray.cluster_utils.Cluster: a head and a second node with the custom resource `node2`, 1 CPU
    each), shared by the multi-node tests one after another (each connects its own driver, then disconnects);
    shut down at the module's end."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 1024**2,
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, resources={"node2": 1}, object_store_memory=100 * 1024**2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_workers_deepspeed_two_stage_livr(zero, ray_local, backbone_cache, data_cache, tmp_path):
    from livr.backbones import load_backbone
    from livr.cluster.ray_train import run_distributed
    from livr.training.runlock import ray_safe_name
    from livr.training.runs import load_run

    ds = "deepspeed_configs/zero2.json" if zero == "zero2" else zero3_json(tmp_path, offload=True)
    name = f"ds-{zero}-résumé"  # Ray needs ASCII names ('ascii' codec can't encode): it gets ray_safe_name(name)
    cache = {"model.cache_vision": True} if zero == "zero2" else {}  # (refused under ZeRO-3)
    # packed: a rank's 2 rows (97 tokens each) of a step, accumulated as 2 micro-batches of 1, become one packed
    # micro-batch: DeepSpeed steps at livr's boundary, not after its 2 (tests/data/test_packing.py: unequal counts)
    pack = {"data.packing": True, "data.max_tokens": 200, "train.micro_batch_size": 1, "train.grad_accum": 2}
    cfg = _cfg(backbone_cache, data_cache, tmp_path, name=name, **{"distributed.deepspeed": ds, **cache, **pack})
    result = run_distributed(cfg)
    assert result["global_step"] == 4 and result["ray_checkpoint"]
    ckpt = result["ray_checkpoint"]
    ray_name = ray_safe_name(name)
    assert ray_name.isascii() and ray_name != name and os.listdir(tmp_path / "runs" / "ray") == [ray_name]
    assert ckpt.startswith(str(tmp_path / "runs" / "ray" / ray_name))
    # rank 0 wrote the gathered checkpoint: safetensors + JSON with a manifest, both ranks' RNG, no pickles
    from livr.training.checkpoint import read_checkpoint
    files = sorted(os.listdir(ckpt))
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".bin"))], files
    ck = read_checkpoint(ckpt)
    assert len(ck["rng"]["ranks"]) == 2 and ck["opt_meta"]["zero_stage"] == int(zero[-1])
    assert ck["opt_meta"]["engine_global_steps"] == 4  # DeepSpeed stepped at each of livr's 4 boundaries
    assert ck["opt_meta"]["optimizer"] == ("DeepSpeedCPUAdam" if zero == "zero3" else "AdamW")  # ZeRO-3 offloads
    assert any(k.endswith(".exp_avg_sq") and v.abs().sum() > 0 for k, v in ck["optimizer"].items()), "AdamW moments"
    # the adapter was gathered: whole tensors that load with PEFT, latent rows trained, other rows untouched
    run = os.path.join(str(tmp_path / "runs"), name)  # the livr run directory keeps the name as given
    assert os.path.exists(os.path.join(run, "final_metrics.json"))
    for rank in (0, 1):
        with open(os.path.join(run, f"memory_rank{rank}.json")) as f:
            mem = json.load(f)
        assert mem["zero_stage"] == int(zero[-1])
        assert mem["built_partitioned"] == (zero == "zero3"), mem  # ZeRO-3: from_pretrained under zero.Init
    _, lm = load_run(run)
    fresh = load_run(run)[1]  # same files, loaded twice: deterministic
    for (n, p), (_, q) in zip(lm.model.named_parameters(), fresh.model.named_parameters()):
        assert p.numel() > 0 and torch.equal(p, q), n
    emb = lm.model.get_input_embeddings()
    base = load_backbone(cfg.model.backbone, cache_dir=cfg.model.cache_dir).model.get_input_embeddings().weight
    ids = torch.arange(base.shape[0])
    with torch.no_grad():
        assert torch.equal(emb(ids), base), "non-latent rows must be unchanged"
        lat = torch.tensor(lm.latent_ids)
        assert emb(lat).abs().sum() > 0
    lora_b = [p for n, p in lm.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA trained"
    # the untied head's latent rows were gathered into the adapter too (whole, equal to their seeded init)
    from safetensors.torch import load_file
    saved = load_file(os.path.join(run, "adapter", "adapter_model.safetensors"))
    (head_key,) = [k for k in saved if "lm_head" in k]
    assert torch.equal(saved[head_key], lm.model.get_base_model().lm_head.weight[lat])


def test_config_errors_before_any_worker(ray_local, backbone_cache, data_cache, tmp_path):
    from livr.cluster.ray_train import run_distributed

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    stage9 = tmp_path / "stage9.json"
    stage9.write_text(json.dumps({"zero_optimization": {"stage": 9}}))
    cases = [({"distributed.deepspeed": str(bad_json)}, "not valid JSON"),
             ({"distributed.deepspeed": str(stage9)}, "stage=9 does not exist"),
             ({"distributed.num_workers": 5}, "needs 5 CPU in all but the cluster has 2"),
             ({"distributed.deepspeed": zero3_json(tmp_path), "model.cache_vision": True}, "cache_vision=true under ZeRO-3")]
    for extra, message in cases:
        cfg = _cfg(backbone_cache, data_cache, tmp_path, name="bad", **extra)
        with pytest.raises(ConfigError, match=message):
            run_distributed(cfg)
    assert not (tmp_path / "runs" / "bad").exists(), "nothing started"


def test_worker_killed_mid_run_resumes_from_checkpoint(backbone_cache, data_cache, tmp_path):
    import time

    import ray
    from mlflow.tracking import MlflowClient

    from livr.cluster.ray_train import run_distributed

    env = {**ENV, "LIVR_FAIL_AT_STEP": "5", "LIVR_FAIL_RANK": "1", "LIVR_FAIL_MODE": "exit",
           "LIVR_FAIL_MARKER": str(tmp_path / "failed-once")}
    _own_cluster()
    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        cfg = _cfg(backbone_cache, data_cache, tmp_path, name="fault", **{
            "train.stage1_steps": 4, "train.stage2_steps": 4, "distributed.checkpoint_every": 2,
            "distributed.max_failures": 3, "distributed.num_to_keep": 1})  # the gloo peer may fail too
        ray_dir = tmp_path / "runs" / "ray" / "fault"
        # a driver killed after an upload, before Ray registered it, leaves such a dir: a worker group drops it
        stray = "checkpoint_2000-01-01_00-00-00.000000"
        (ray_dir / stray).mkdir(parents=True)
        t0 = time.time()
        result = run_distributed(cfg)
        wall = time.time() - t0
        after_restart = sorted(p.name for p in ray_dir.glob("checkpoint_*") if p.is_dir())
    finally:
        ray.shutdown()
    assert (tmp_path / "failed-once").exists(), "the injected failure happened"
    assert result["global_step"] == 8, result
    assert result["resumed_from"] and all(s > 0 for s in result["resumed_from"]), result  # never from zero
    assert result["resumed_from"][0] in (2, 4)  # the last registered checkpoint before step 5
    # num_to_keep=1 holds after the restart (the report in flight when rank 1 died left an unregistered upload)
    assert len(after_restart) == 1 and result["ray_checkpoint"].endswith(after_restart[0]), (after_restart, result)
    assert stray not in after_restart
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    print(f"fault test: wall {wall:.1f} s, resumed from {result['resumed_from']}")


def test_two_nodes_one_worker_each_equal_one_worker_with_accumulation(two_raylets, backbone_cache, data_cache,
                                                                      tmp_path):
    """2 workers on 2 nodes (one each) × micro-batch b == 1 process × accumulation 2, over the same global batches."""
    import ray
    from mlflow.tracking import MlflowClient

    from livr.cluster.ray_train import run_distributed
    from livr.training.train import train_worker

    _own_cluster()
    try:
        ray.init(address=two_raylets.address, runtime_env={"env_vars": ENV})
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        common = {"lora.dropout": 0.0, "train.stage1_steps": 3, "train.stage2_steps": 3}
        two = _cfg(backbone_cache, data_cache, tmp_path, name="two", **common,  # the vision cache on one side only
                   **{"distributed.placement_strategy": "STRICT_SPREAD", "model.cache_vision": True,
                      "distributed.storage_path": str(tmp_path / "shared"),  # both raylets see this machine's disk
                      "distributed.storage_shared": True})
        result = run_distributed(two)
        assert result["global_step"] == 6
    finally:
        ray.shutdown()
    one = _cfg(backbone_cache, data_cache, tmp_path, name="one", **common,
               **{"distributed.num_workers": 0, "train.grad_accum": 2})
    train_worker(one)
    client = MlflowClient(two.tracking.uri)
    exp = client.get_experiment_by_name(two.tracking.experiment)
    runs = {r.info.run_name: r.info.run_id for r in client.search_runs([exp.experiment_id])}
    for key in ("stage1/loss", "stage2/loss"):
        a = sorted((m.step, m.value) for m in client.get_metric_history(runs["two"], key))
        b = sorted((m.step, m.value) for m in client.get_metric_history(runs["one"], key))
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) == 3
        assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b)), (a, b)
    hits = [m.value for m in client.get_metric_history(runs["two"], "vision_cache/hit_rate")]
    assert hits and max(hits) > 0, "the cached side read features from its cache"


def test_multi_node_needs_shared_storage_before_any_worker(two_raylets, backbone_cache, data_cache, tmp_path):
    """Two raylets: an empty distributed.storage_path, or a local one not declared shared, is a one-line error
    naming the key before any worker starts; a URI or distributed.storage_shared=true passes the check."""
    import ray

    from livr.cluster.ray_train import check_storage, run_distributed

    _own_cluster()
    try:
        ray.init(address=two_raylets.address, runtime_env={"env_vars": ENV})
        local = str(tmp_path / "node-local")
        for extra, message in (({}, "distributed.storage_path is empty but the Ray cluster has 2 nodes"),
                               ({"distributed.storage_path": local}, (f"distributed.storage_path='{local}' is a local "
                                "path and the Ray cluster has 2 nodes: if every node mounts it (NFS, Lustre), set "
                                "distributed.storage_shared=true"))):
            cfg = _cfg(backbone_cache, data_cache, tmp_path, name="spread", **extra)
            with pytest.raises(ConfigError) as e:
                run_distributed(cfg)
            assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not os.path.exists(tmp_path / "runs" / "spread" / "config.yaml")  # no worker ran
        assert not os.path.exists(tmp_path / "runs" / "ray") and not os.path.exists(local)
        for extra in ({"distributed.storage_path": "s3://bucket/livr"},
                      {"distributed.storage_path": local, "distributed.storage_shared": True}):
            check_storage(_cfg(backbone_cache, data_cache, tmp_path, name="spread", **extra))
    finally:
        ray.shutdown()
