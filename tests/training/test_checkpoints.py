"""Checkpoints: checked against their manifest before use, recovered after a crash mid-swap, never a pickle,
and exact: killed and resumed equals uninterrupted, bit for bit, with the default LoRA dropout (0.05), in one
process, on 2 gloo ranks (DDP) and under DeepSpeed ZeRO-2 and ZeRO-3; another world size with the same global
batch resumes, a different global batch is refused.

The 2-rank runs share one pair of spawned processes (`two_ranks`): imports and process start-up are paid once.
"""
import contextlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_overrides, zero3_json
from safetensors.torch import load_file

import livr.training.train
from livr.config import load_config
from livr.training.checkpoint import CheckpointError, trainable_state, verify_checkpoint
from livr.training.distributed import teardown_distributed
from livr.training.train import train_worker

# 16 rows, global batch 4: 4 steps per epoch; Stage 1 = 1.5 epochs (validations at steps 4, 6), Stage 2 = 3 steps
EXTRA = {"train.stage1_steps": 6, "train.stage2_steps": 3, "distributed.checkpoint_every": 1, "optim.lr": 1e-2,
         "eval.splits": "[val]", "tracking.enabled": False}


def _overrides(backbone_cache, data_cache, tmp_path, **extra):
    return tiny_overrides(backbone_cache, data_cache, tmp_path, **{**EXTRA, **extra})


def _cfg(backbone_cache, data_cache, tmp_path, **extra):
    return load_config(None, _overrides(backbone_cache, data_cache, tmp_path, **extra))


def _json(path):
    return json.loads(Path(path).read_text())


def _ckpt(run_dir, name="last"):
    return os.path.join(run_dir, "checkpoints", name)


def _equal_files(a: str, b: str) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), (a, k, (x[k].float() - y[k].float()).abs().max().item())


def _same_run(ref_dir: str, got_dir: str) -> None:
    """The same weights, optimizer moments and step counts, validations and best selection, bit for bit."""
    for f in ("last/trainable.safetensors", "last/optimizer.safetensors", "best.safetensors"):
        _equal_files(os.path.join(ref_dir, "checkpoints", f), os.path.join(got_dir, "checkpoints", f))
    states = [_json(os.path.join(d, "checkpoints", "last", "state.json")) for d in (ref_dir, got_dir)]
    assert states[0]["history"] == states[1]["history"] and states[0]["best_at"] == states[1]["best_at"]


def _kill_at(cfg, monkeypatch, *steps):
    for at in steps:
        monkeypatch.setenv("LIVR_FAIL_AT_STEP", str(at))
        with pytest.raises(RuntimeError, match=f"injected failure at step {at}"):
            train_worker(cfg)
    monkeypatch.delenv("LIVR_FAIL_AT_STEP")


@pytest.fixture(scope="module")
def whole(tmp_path_factory, backbone_cache, data_cache):
    """The uninterrupted one-process run (default dropout) every other one-process run is compared with."""
    tmp = tmp_path_factory.mktemp("whole")
    cfg = _cfg(backbone_cache, data_cache, tmp, name="whole")
    assert cfg.lora.dropout == 0.05
    return cfg, train_worker(cfg)


def test_killed_and_resumed_equals_uninterrupted_with_dropout(whole, backbone_cache, data_cache, tmp_path, monkeypatch):
    ref_cfg, ref = whole
    cfg = _cfg(backbone_cache, data_cache, tmp_path, name="cut")
    _kill_at(cfg, monkeypatch, 2, 7)  # mid-epoch of Stage 1; the middle of Stage 2
    got = train_worker(cfg)
    assert got["resumed_from"] == [1, 6] and got["global_step"] == ref["global_step"] == 9
    _same_run(ref_cfg.run_dir, cfg.run_dir)
    rng = _json(os.path.join(_ckpt(cfg.run_dir), "rng.json"))
    assert rng["world_size"] == 1 and set(rng["ranks"][0]) >= {"python", "numpy", "torch"}
    state = _json(os.path.join(_ckpt(cfg.run_dir), "state.json"))
    assert state["world_size"] == 1 and state["global_batch"] == 4


def test_a_corrupt_checkpoint_file_is_one_line_naming_it(backbone_cache, data_cache, tmp_path, monkeypatch, capsys):
    cfg = _cfg(backbone_cache, data_cache, tmp_path, name="corrupt")
    _kill_at(cfg, monkeypatch, 3)
    last = _ckpt(cfg.run_dir)
    verify_checkpoint(last)
    target = os.path.join(last, "trainable.safetensors")
    good = Path(target).read_bytes()
    Path(target).write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError) as e:
        train_worker(cfg)
    msg = str(e.value)
    assert target in msg and "corrupt" in msg and "\n" not in msg and "train.resume=false" in msg
    from livr.cli import main

    capsys.readouterr()
    assert main(["train", "--config", os.path.join(cfg.run_dir, "config.yaml")]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("livr")]  # (transformers' loading bar aside)
    assert "Traceback" not in err and len(ours) == 1
    assert ours[0].startswith("livr: error: checkpoint file") and target in ours[0]
    # the same size, one byte changed: the hash finds it
    Path(target).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        verify_checkpoint(last)
    Path(target).write_bytes(good)
    os.remove(os.path.join(last, "manifest.json"))
    with pytest.raises(CheckpointError, match=r"incomplete: manifest\.json is missing"):
        verify_checkpoint(last)


def test_crash_between_the_two_renames_resumes_from_the_newest(whole, backbone_cache, data_cache, tmp_path, monkeypatch,
                                                                capsys):
    """`last` -> `last.old` done, `last.tmp-4` -> `last` not: the run continues from step 4, not from 0."""
    cfg = _cfg(backbone_cache, data_cache, tmp_path, name="swap")
    last = _ckpt(cfg.run_dir)
    _kill_at(cfg, monkeypatch, 3)
    shutil.copytree(last, str(tmp_path / "step2"))
    _kill_at(cfg, monkeypatch, 5)
    os.replace(last, last + ".tmp-4")  # the complete new checkpoint, never renamed into place
    shutil.copytree(str(tmp_path / "step2"), last + ".old")  # the previous one, already moved aside
    shutil.copytree(last + ".tmp-4", last + ".tmp-5")
    os.remove(os.path.join(last + ".tmp-5", "manifest.json"))  # a newer write cut short: must not be used
    capsys.readouterr()
    got = train_worker(cfg)
    assert "recovered it from last.tmp-4 (global step 4)" in capsys.readouterr().out
    assert got["resumed_from"] == [2, 4] and got["global_step"] == 9
    assert [n for n in os.listdir(os.path.dirname(last)) if n.startswith("last")] == ["last"]  # leftovers removed
    _same_run(whole[0].run_dir, cfg.run_dir)


def test_a_corrupt_best_falls_back_and_the_run_finishes(backbone_cache, data_cache, tmp_path, monkeypatch, capsys):
    """Validations 0.5 (step 2), 0.9 (step 6), 0.1 (step 8): best = step 6, best.prev = step 2. With best
    truncated, the resumed run selects best.prev (0.5 > the final 0.1); with both unusable, the final weights."""
    scores = {"val": [0.5, 0.9, 0.1]}

    def fake_evaluate(lm, cfg, splits, names, bottleneck, ctx, quiet, loaders):
        acc = scores["val"].pop(0) if scores["val"] else 0.3
        return {n: {"accuracy": {"Counting": acc}, "mean": acc, "predictions": []} for n in names}

    saved = {}
    real_save = livr.training.train.save_run_artifacts
    monkeypatch.setattr(livr.training.train, "_evaluate", fake_evaluate)
    monkeypatch.setattr(livr.training.train, "save_run_artifacts",
                        lambda lm, run_dir: (saved.update(trainable_state(lm.model)), real_save(lm, run_dir)))
    cfg = _cfg(backbone_cache, data_cache, tmp_path, name="best", **{"train.stage1_steps": 2, "train.stage2_steps": 6,
                                                                      "distributed.checkpoint_every": 0})
    assert train_worker(cfg)["best_val_accuracy"] == 0.9
    ck = os.path.dirname(_ckpt(cfg.run_dir))
    files = {n: load_file(os.path.join(ck, n)) for n in ("best.safetensors", "best.prev.safetensors")}
    final = load_file(os.path.join(ck, "last", "trainable.safetensors"))
    assert all(torch.equal(saved[k], files["best.safetensors"][k]) for k in saved)
    assert _json(os.path.join(ck, "best.prev.json"))["global_step"] == 2
    assert any(not torch.equal(files["best.prev.safetensors"][k], final[k]) for k in final)

    best = os.path.join(ck, "best.safetensors")
    os.truncate(best, os.path.getsize(best) // 2)
    capsys.readouterr()
    os.remove(os.path.join(cfg.run_dir, "final_metrics.json"))  # as if killed in its final evaluation (a finished
    got = train_worker(cfg)  # run is not run again); resumed after the last stage: straight to finish
    err = capsys.readouterr().err
    assert "warning: the best selection cannot be used" in err and "selecting best.prev.safetensors" in err
    assert got["best_val_accuracy"] == 0.5
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], files["best.prev.safetensors"][k]) for k in saved)
    assert _json(os.path.join(cfg.run_dir, "eval.json"))["selected"] == {"stage": "stage1", "epoch": 1}

    os.remove(os.path.join(ck, "best.prev.json"))
    saved.clear()
    os.remove(os.path.join(cfg.run_dir, "final_metrics.json"))
    got = train_worker(cfg)
    assert "selecting the final weights" in capsys.readouterr().err and got["best_val_accuracy"] == 0.1
    assert all(torch.equal(saved[k], final[k]) for k in final)


# ----------------------------------------------------------------------------- two ranks (spawned gloo processes)
class _Payload:
    """Unpickling this creates the marker file: what DeepSpeed's torch.load(weights_only=False) would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickles(ckpt: str, marker: str) -> None:
    blob = pickle.dumps(_Payload(marker))
    os.makedirs(os.path.join(ckpt, "livr"), exist_ok=True)
    for name in ("livr/mp_rank_00_model_states.pt", "livr/zero_pp_rank_0_mp_rank_00_optim_states.pt", "payload.pkl",
                 "trainable.pt"):
        with open(os.path.join(ckpt, name), "wb") as f:
            f.write(blob)
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write("livr")


def _job(name, overrides, rank, fail_at=(), resume_from=None, plant=None):
    """Run train_worker on this rank (killed after each step in `fail_at`, then to the end); the outcome."""
    cfg = load_config(None, overrides + [f"name={name}"])
    os.environ["LIVR_FAIL_RANK"] = str(rank)  # every rank fails at the same point, as a killed job would stop
    for at in fail_at:
        os.environ["LIVR_FAIL_AT_STEP"] = str(at)
        try:
            train_worker(cfg, report=lambda m, c: None)
        except RuntimeError as e:
            assert "injected failure" in str(e), e
        if plant and rank == 0:
            _plant_pickles(_ckpt(cfg.run_dir), plant)
        dist.barrier()
    os.environ.pop("LIVR_FAIL_AT_STEP", None)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            out = {"result": train_worker(cfg, report=lambda m, c: None, resume_from=resume_from)}
        except CheckpointError as e:
            out = {"error": str(e)}
    return {**out, "stderr": err.getvalue()}


def _two_rank_worker(rank: int, init: str, jobs: list, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")  # DeepSpeed asks
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        results = {name: _job(name, *args, rank=rank, **kw) for name, args, kw in jobs}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        teardown_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, backbone_cache, data_cache):
    """Runs on 2 gloo ranks, uninterrupted and killed + resumed: DDP, ZeRO-2 (with pickles planted in its
    checkpoint), ZeRO-3; and resumes of a one-process checkpoint (global batch 4 = 2 x 2 accumulation) on 2
    ranks with the same global batch (2 x 1 x 2) and with another (2 x 2 x 2)."""
    from livr.training.ds_setup import prebuild_cpu_comm_op

    tmp = tmp_path_factory.mktemp("two_ranks")
    prebuild_cpu_comm_op()
    base = _overrides(backbone_cache, data_cache, tmp, **{"train.micro_batch_size": 2, "data.num_workers": 0})
    one = base + ["train.grad_accum=2", "lora.dropout=0.0"]
    whole1 = load_config(None, one + ["name=one-whole"])
    train_worker(whole1)
    cut1 = load_config(None, one + ["name=one-cut"])
    os.environ["LIVR_FAIL_AT_STEP"] = "3"
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            train_worker(cut1)
    finally:
        del os.environ["LIVR_FAIL_AT_STEP"]
    z2, z3 = [f"distributed.deepspeed={p}" for p in ("deepspeed_configs/zero2.json", zero3_json(tmp))]
    src = _ckpt(cut1.run_dir)
    marker = str(tmp / "pickle-ran")
    jobs = [("ddp-whole", (base,), {}), ("ddp-cut", (base,), {"fail_at": (2, 7)}),
            ("z2-whole", (base + [z2],), {}), ("z2-cut", (base + [z2],), {"fail_at": (3, 7), "plant": marker}),
            ("z3-whole", (base + [z3],), {}), ("z3-cut", (base + [z3],), {"fail_at": (5,)}),
            ("from-one", (base + ["lora.dropout=0.0"],), {"resume_from": src}),
            ("other-batch", (base + ["train.grad_accum=2"],), {"resume_from": src})]
    out = str(tmp / "results.json")
    mp.spawn(_two_rank_worker, nprocs=2, join=True, args=(str(tmp / "pg"), jobs, out))
    with open(out) as f:
        return {"results": json.load(f), "runs": str(tmp / "runs"), "marker": marker, "one": whole1.run_dir}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "z2", "z3"])
def test_two_ranks_killed_and_resumed_equal_uninterrupted(two_ranks, kind):
    """Bit for bit with dropout 0.05: weights, AdamW moments and steps (gathered from the ZeRO partitions),
    validations and best selection. Each rank restored its own RNG state (rng.json has both)."""
    res = two_ranks["results"]
    whole, cut = res[f"{kind}-whole"]["result"], res[f"{kind}-cut"]["result"]
    assert whole["global_step"] == cut["global_step"] == 9
    assert cut["resumed_from"] == {"ddp": [1, 6], "z2": [2, 6], "z3": [4]}[kind]
    runs = two_ranks["runs"]
    _same_run(os.path.join(runs, f"{kind}-whole"), os.path.join(runs, f"{kind}-cut"))
    rng = _json(os.path.join(runs, f"{kind}-cut", "checkpoints", "last", "rng.json"))
    assert rng["world_size"] == 2 and len(rng["ranks"]) == 2


@pytest.mark.slow
def test_pickles_planted_in_a_zero2_checkpoint_are_never_loaded(two_ranks, tmp_path):
    res = two_ranks["results"]["z2-cut"]
    assert res["result"]["resumed_from"] == [2, 6]  # resumed twice from checkpoints holding the planted files
    assert not os.path.exists(two_ranks["marker"]), "a planted pickle was executed"
    with open(os.path.join(tmp_path, "p.pkl"), "wb") as f:  # the payload is live: unpickling it runs it
        f.write(pickle.dumps(_Payload(str(tmp_path / "ran"))))
    with open(os.path.join(tmp_path, "p.pkl"), "rb") as f:
        pickle.load(f)  # the point: this payload runs when unpickled
    assert (tmp_path / "ran").exists()


@pytest.mark.slow
def test_resume_on_another_world_size(two_ranks):
    """1 process x accumulation 2 killed at step 3, resumed on 2 ranks x 1: continues from step 2 with a one-line
    warning about the RNG states, and ends where the uninterrupted one-process run ends (dropout 0; the sums
    over ranks are ordered differently, hence a tolerance). Global batch 8 instead of 4: refused in one line."""
    res = two_ranks["results"]
    got = res["from-one"]
    assert got["result"]["resumed_from"] == [2] and got["result"]["global_step"] == 9
    warning = [line for line in got["stderr"].splitlines() if "RNG states" in line]
    assert len(warning) == 1 and "cannot map 1:1" in warning[0]
    a = load_file(os.path.join(two_ranks["one"], "checkpoints", "last", "trainable.safetensors"))
    b = load_file(os.path.join(two_ranks["runs"], "from-one", "checkpoints", "last", "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    err = res["other-batch"]["error"]
    assert "\n" not in err and "global batch 4" in err and "train.micro_batch_size 2 x train.grad_accum 2 x 2" in err
