"""Validation before anything starts: config values, run names, one live run per directory (run lock), the
same-run check across path spellings, and data rows (duplicate idx, empty image slots, missing choices)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, tiny_overrides

from livr.config import ConfigError, from_dict, load_config, save_config
from livr.training.runlock import check_same_run, lock_held, ray_safe_name, read_holder, run_lock


# ----------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override, key", [
    ("optim.lr=nan", "optim.lr=nan"),
    ("optim.weight_decay=.inf", "optim.weight_decay=inf"),
    ("lora.dropout=nan", "lora.dropout=nan"),
    ("train.max_grad_norm=inf", "train.max_grad_norm=inf"),
    ("data.options={shape_size: .nan}", "data.options.shape_size=nan"),
    ("distributed.cpus_per_worker=-1", "distributed.cpus_per_worker=-1"),
    ("distributed.cpus_per_worker=0", "distributed.cpus_per_worker=0"),
    ("distributed.gpus_per_worker=-1", "distributed.gpus_per_worker=-1.0"),
    ("distributed.max_failures=-2", "distributed.max_failures=-2"),
    ("distributed.num_to_keep=0", "distributed.num_to_keep=0"),
    ("distributed.checkpoint_every=-1", "distributed.checkpoint_every=-1"),
    ("model.device=tpu", "model.device='tpu'"),
    ("model.device=cuda:x", "model.device='cuda:x'"),
    ("model.backbone=/nonexistent", "model.backbone='/nonexistent'"),
    ("model.backbone=./no/such/dir", "model.backbone='./no/such/dir'"),
    ("model.backbone=~/no-such-livr-backbone", "model.backbone='~/no-such-livr-backbone'"),
    ("name=..", "name='..'"),
    ("name=.", "name='.'"),
    ("name=a/b", "name='a/b'"),
    ("name=.hidden", "name='.hidden'"),
    ("name=a\\b", "name='a\\\\b'"),
    ("name=a\tb", "name='a\\tb'"),
])
def test_bad_value_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"config: {key}:" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_values_and_where_paths_are_checked(tmp_path):
    for ok in ("model.device=cuda:1", "model.device=cpu", "distributed.max_failures=-1",
               "model.backbone=Qwen/Qwen2.5-VL-3B-Instruct", f"model.backbone={tmp_path}", "model.backbone=tiny-qwen3-vl"):
        load_config(None, [ok])
    # a Ray worker or Tune trial builds its config with from_dict: no filesystem check there
    assert from_dict({"model": {"backbone": "/only/on/the/driver"}}).model.backbone == "/only/on/the/driver"


def test_unicode_name_and_its_ray_form():
    cfg = load_config(None, ["name=modèle-été"])
    assert cfg.run_dir.endswith("modèle-été")
    ray = ray_safe_name(cfg.name)
    assert ray.isascii() and ray.startswith("modele-ete-") and len(ray) == len("modele-ete-") + 8
    assert ray_safe_name("modèle-été") == ray != ray_safe_name("modele-été")  # stable, and names stay apart
    assert ray_safe_name("demo_1.b-2") == "demo_1.b-2"  # an ASCII-safe name is unchanged
    assert ray_safe_name("模型").startswith("run-") and ray_safe_name("模型").isascii()


# ----------------------------------------------------------------------------------------- run lock
def _hold(run_dir) -> subprocess.Popen:
    """A child process that takes the run lock and sleeps (until killed)."""
    code = ("import sys, time\nfrom livr.training.runlock import run_lock\nwith run_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _snapshot(path) -> dict:
    out = {}
    for root, dirs, files in os.walk(path):
        for n in [".", *files]:
            st = os.stat(os.path.join(root, n))
            out[os.path.join(root, n)] = (st.st_mtime_ns, st.st_size)
    return out


def test_live_run_is_refused_and_a_dead_holder_is_stale(tmp_path, backbone_cache, data_cache):
    run_dir = tmp_path / "runs" / "locked"
    proc = _hold(run_dir)
    try:
        with pytest.raises(ConfigError) as e, run_lock(str(run_dir)):
            pass
        msg = str(e.value)
        assert msg.startswith("config: name='locked':") and f"pid {proc.pid} on host {socket.gethostname()}" in msg
        assert "another name=" in msg and "\n" not in msg
        # the same through the CLI: exit 2, one line, and nothing in the run directory touched
        before = _snapshot(run_dir)
        tiny = tiny_overrides(backbone_cache, data_cache, tmp_path, name="locked", **{"train.stage1_steps": 1,
                              "train.stage2_steps": 1, "tracking.enabled": False})  # quick, should the lock fail
        out = subprocess.run([sys.executable, "-m", "livr.cli", "train", "--config", "configs/demo.yaml", *tiny],
                             capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("livr: error: config: name='locked'"), out.stderr
        assert f"pid {proc.pid}" in lines[0]
        assert _snapshot(run_dir) == before
        proc.send_signal(signal.SIGKILL)  # kill -9: the kernel drops its flock; not reaped yet (a zombie)
        deadline = time.time() + 10
        while _proc_state(proc.pid) != "Z" and time.time() < deadline:
            time.sleep(0.01)
        assert _proc_state(proc.pid) == "Z"
        assert read_holder(str(run_dir))["pid"] == proc.pid  # its record is left behind, stale
        with run_lock(str(run_dir)):
            assert read_holder(str(run_dir))["pid"] == os.getpid()
        assert read_holder(str(run_dir)) is None  # released: the record is gone
    finally:
        proc.kill()
        proc.wait()


def test_lock_released_on_error_nested_and_pid_fallback(tmp_path):
    d = str(tmp_path / "run")
    with pytest.raises(RuntimeError), run_lock(d):
        raise RuntimeError("boom")
    assert not lock_held(d) and not os.path.exists(d)  # released; the directory it made, left empty, removed
    os.makedirs(d)
    with run_lock(d):  # free again after the exception
        with run_lock(d):  # the owner taking it again (e.g. train_worker under the driver): a no-op
            assert lock_held(d)
        assert lock_held(d) and read_holder(d)["pid"] == os.getpid()
    assert not lock_held(d)
    # where flock does not exclude (NFS local_lock): a live holder on this host recorded in .lock.json refuses
    parent = os.getppid()
    with open(f"/proc/{parent}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    record = '{"host": "%s", "pid": %d, "proc_start": %s, "started": "then"}'
    with open(os.path.join(d, ".lock.json"), "w") as f:
        f.write(record % (socket.gethostname(), parent, stat[19]))
    with pytest.raises(ConfigError, match=f"pid {parent} on host"), run_lock(d):
        pass
    with open(os.path.join(d, ".lock.json"), "w") as f:  # the same pid reused by another process: stale
        f.write(record % (socket.gethostname(), parent, int(stat[19]) + 1))
    with run_lock(d):
        pass


# ----------------------------------------------------------------------------------------- same run
def test_same_run_check_compares_resolved_paths_not_spelling(tmp_path, monkeypatch):
    from livr.cluster.ray_train import absolute_paths

    (tmp_path / "bb").mkdir()
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    rel = ["name=r", "output_dir=runs", "model.backbone=./bb", "data.source=data", "data.tasks=[Counting]"]
    saved = load_config(None, rel)
    path = str(tmp_path / "runs" / "r" / "config.yaml")
    save_config(saved, path)
    spelled = [f"output_dir={tmp_path}/runs/", f"model.backbone={tmp_path}/bb/", f"data.source={tmp_path}/./data",
               "data.tasks=[Counting]", "name=r", "model.device=cpu", "data.num_workers=0", "train.resume=true"]
    check_same_run(load_config(None, spelled), path)
    check_same_run(absolute_paths(load_config(None, rel + ["distributed.num_workers=2"])), path)  # Ray mode
    with pytest.raises(ConfigError) as e:
        check_same_run(load_config(None, spelled + ["optim.lr=3e-4"]), path)
    assert "(optim.lr: 0.0001 there, 0.0003 now)" in str(e.value) and "\n" not in str(e.value)


def test_killed_run_resumes_with_paths_spelled_differently(tmp_path, monkeypatch, backbone_cache, data_cache):
    from livr.backbones import resolve_backbone_path
    from livr.training.train import train_worker

    _write_local(tmp_path / "data", "Counting", {"train": 16, "val": 8, "test": 8})
    bb = resolve_backbone_path("tiny-qwen2.5-vl", backbone_cache)
    monkeypatch.chdir(tmp_path)
    steps = {"train.stage1_steps": 2, "train.stage2_steps": 2, "tracking.enabled": False, "data.tasks": "[Counting]",
             "name": "spelled", "eval.splits": "[val]"}
    rel = {"output_dir": "runs", "data.source": "data", "model.backbone": os.path.relpath(bb) + "/"}
    monkeypatch.setenv("LIVR_FAIL_AT_STEP", "3")
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        train_worker(load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **steps, **rel)))
    monkeypatch.delenv("LIVR_FAIL_AT_STEP")
    spelled = {"output_dir": f"{tmp_path}/./runs", "data.source": str(tmp_path / "data"), "model.backbone": bb,
               "data.num_workers": 0, "model.device": "cpu"}
    result = train_worker(load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **steps, **spelled)))
    assert result["resumed_from"] == [2] and result["global_step"] == 4
    assert read_holder(str(tmp_path / "runs" / "spelled")) is None  # the lock was released


# ----------------------------------------------------------------------------------------- data rows
def _write_local(root, task, sizes: dict, spoil=None) -> str:
    from datasets import Dataset

    from livr.data import features, generate_task

    os.makedirs(root / task, exist_ok=True)
    for split, n in sizes.items():
        rows = generate_task(task, n, seed=1, split=split, image_size=56)
        if spoil and split == "val":
            spoil(rows)
        Dataset.from_list(rows, features=features()).to_parquet(str(root / task / f"{split}.parquet"))
    return str(root)


def _dup(rows):
    rows[3]["idx"] = rows[1]["idx"]


def _second_image(rows):
    rows[2]["question"] = "Is the shape in image 1 also in the second image?"


def _missing_third(rows):
    rows[2].update(image_3=None, prompt="")  # its choice "the third image" names an empty slot


def _no_choices(rows):
    rows[2].update(choices=[], prompt="")


def _letter_without_choices(rows):
    rows[2].update(choices=[], prompt="", answer="(B)")


@pytest.mark.parametrize("task, spoil, msg", [
    ("Counting", _dup, "Counting/val idx=Counting_val_1: duplicate idx (rows 1 and 3)"),
    ("Counting", _second_image, "Counting/val idx=Counting_val_2: question refers to 'second image', but image_2 is empty"),
    ("Jigsaw", _missing_third, "Jigsaw/val idx=Jigsaw_val_2: choices[1] refers to 'third image', but image_3 is empty"),
    ("Jigsaw", _no_choices, "Jigsaw/val idx=Jigsaw_val_2: no choices, but Jigsaw is a multiple-choice task"),
    ("Counting", _letter_without_choices, "Counting/val idx=Counting_val_2: answer '(B)' is a choice letter, but the row"),
])
def test_bad_rows_are_one_line_naming_the_row(tmp_path, task, spoil, msg):
    from livr.data.splits import load_splits
    from livr.data.tasks import DataError

    src = _write_local(tmp_path, task, {"val": 5}, spoil)
    cfg = load_config(None, [f"data.source={src}", f"data.tasks=[{task}]", "data.val_size=0"])
    with pytest.raises(DataError) as e:
        load_splits(cfg, only=["val"])
    assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
    _write_local(tmp_path, task, {"val": 5})
    assert len(load_splits(cfg, only=["val"])["val"]) == 5  # the same rows unspoilt load
