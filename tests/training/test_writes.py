"""Writes that fail cleanly (issue 30 #2), with a real failing write: RLIMIT_FSIZE in a subprocess (SIGXFSZ ignored,
so the write raises EFBIG, as a full disk raises ENOSPC). A checkpoint, best, run artifact or export write that
fails leaves the previous complete copy in place, removes its partial copy and ends with a one-line error naming
the path; the next launch resumes from the previous checkpoint."""
import glob
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, tiny_overrides

from livr.training.checkpoint import read_best, verify_checkpoint

pytestmark = pytest.mark.slow  # real clusters / servers / whole runs: not in the fast tier

LIMIT = 32 * 1024  # above config.yaml and the JSONs, below the tiny run's safetensors (~38 KiB and more)


def _limited(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return preexec


def _run(args, limit=None, env=None, script=None):
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "livr.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, **(env or {})}, preexec_fn=_limited(limit) if limit else None)


def _leftovers(d: str) -> list[str]:
    return [p for p in glob.glob(os.path.join(d, "**", "*"), recursive=True) + glob.glob(os.path.join(d, ".*"))
            if ".tmp" in os.path.basename(p)]


def _one_error(out) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("livr: error:")]
    assert len(errors) == 1, out.stderr
    return errors[0]


def test_failed_writes_keep_the_previous_copy_and_resume(backbone_cache, data_cache, tmp_path):
    over = ["train", "--config", "configs/demo.yaml", *tiny_overrides(backbone_cache, data_cache, tmp_path, name="full", **{
        "train.stage1_steps": 6, "train.stage2_steps": 2, "eval.splits": "[val]", "data.num_workers": 0,
        "tracking.enabled": False})]
    run_dir = str(tmp_path / "runs" / "full")
    ckpts = os.path.join(run_dir, "checkpoints")
    # 1. a crash after step 5: the checkpoint of step 4 (the first epoch's end) and its best
    out = _run(over, env={"LIVR_FAIL_AT_STEP": "5"})
    assert out.returncode != 0 and "injected failure at step 5" in out.stderr, out.stderr
    before = {f: Path(f).read_bytes() for f in glob.glob(os.path.join(ckpts, "**", "*"), recursive=True)
              if os.path.isfile(f)}
    # 2. resumed with a file-size limit: the next checkpoint or best write fails
    err = _one_error(_run(over, limit=LIMIT))
    assert f"could not write {ckpts}/" in err and "File too large (EFBIG)" in err, err
    assert "the last checkpoint is at global step 4; resume with: livr train" in err, err
    assert not _leftovers(ckpts), _leftovers(ckpts)
    verify_checkpoint(os.path.join(ckpts, "last"))
    read_best(ckpts)
    after = {f: Path(f).read_bytes() for f in glob.glob(os.path.join(ckpts, "**", "*"), recursive=True)
             if os.path.isfile(f)}
    assert after == before  # nothing complete was lost or changed
    # 3. without the limit: resumes from the previous checkpoint and finishes
    out = _run(over)
    assert out.returncode == 0, out.stderr
    final = json.loads(Path(run_dir, "final_metrics.json").read_text())
    assert final["resumed_from"] == [4] and final["global_step"] == 8

    # 4. best, run artifacts and export under the limit, in one process that lowers its own limit after a good export
    export, spare = str(tmp_path / "export"), str(tmp_path / "spare")
    script = textwrap.dedent(f"""
        import json, os, resource, shutil, signal, torch
        from livr.training.checkpoint import save_best, save_run_artifacts
        from livr.tools.export import export_run
        from livr.training.runs import load_run
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        export_run({run_dir!r}, {export!r})
        shutil.copytree({run_dir!r}, {spare!r})
        save_best({spare!r}, {{"w": torch.ones(4)}}, {{"val_accuracy": 0.5}})
        cfg, lm = load_run({spare!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        errors = {{}}
        for what, fn in (("export", lambda: export_run({run_dir!r}, {export!r})),
                         ("best", lambda: save_best({spare!r}, {{"w": torch.ones(20000)}}, {{"val_accuracy": 0.9}})),
                         ("artifacts", lambda: save_run_artifacts(lm, {spare!r}))):
            try:
                fn()
                errors[what] = None
            except Exception as e:
                errors[what] = type(e).__name__ + ": " + str(e)
        print(json.dumps(errors))
    """)
    out = _run(None, script=script, env={"PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    for what, path in (("export", export), ("best", os.path.join(spare, "best.safetensors")),
                       ("artifacts", os.path.join(spare, "adapter"))):
        assert errors[what] and errors[what].startswith(f"WriteError: could not write {path}: File too large"), errors
        assert "\n" not in errors[what]
    assert json.loads(Path(export, "livr_export.json").read_text())["layout"] == "merged"  # the previous export
    assert not _leftovers(str(tmp_path)), _leftovers(str(tmp_path))
    assert read_best(spare)[1]["val_accuracy"] == 0.5  # the previous best stays
    assert os.listdir(os.path.join(spare, "adapter")) == os.listdir(os.path.join(run_dir, "adapter"))
