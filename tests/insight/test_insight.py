"""Insight tools: `livr verify` (the bottleneck, measured), `livr inspect` (what the latents do), `livr report`."""
import csv
import json
import os

import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

from livr.backbones import TINY_PRESETS
from livr.cli import main
from livr.config import load_config
from livr.insight.verify import run_verify, verify
from livr.method.groups import ANSWER, IMAGE
from livr.method.mask import bottleneck_mask

FAMILIES = list(TINY_PRESETS)  # one per registered family


def _cfg(backbone_cache, data_cache, tmp_path, **extra):
    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **extra))


# ----------------------------------------------------------------------------- verify
@pytest.mark.parametrize("backbone", FAMILIES)
def test_verify_passes_on_every_family(backbone, backbone_cache, data_cache, tmp_path):
    checks = verify(_cfg(backbone_cache, data_cache, tmp_path, **{"model.backbone": backbone}))
    assert [c.name[:3] for c in checks] == ["(a)", "(b)", "(c)", "(d)"]
    assert all(c.passed for c in checks), "\n".join(c.line() for c in checks)
    a, b, c, d = checks
    assert a.value == 0 and c.value == 0 and d.value == 0  # exactly zero, not merely small
    assert b.value > 0


def _leaky(groups, dtype):
    """The Stage-1 mask with one hole: the first answer row may see the first image column."""
    mask = bottleneck_mask(groups, dtype).clone()
    for i in range(groups.shape[0]):
        row = int((groups[i] == ANSWER).nonzero()[0])
        col = int((groups[i] == IMAGE).nonzero()[0])
        mask[i, 0, row, col] = 0
    return mask


def test_verify_fails_on_a_leaking_mask(backbone_cache, data_cache, tmp_path, capsys):
    cfg = _cfg(backbone_cache, data_cache, tmp_path, **{"data.tasks": "Jigsaw"})  # three images per example
    checks = {c.name[:3]: c for c in verify(cfg, mask_fn=_leaky)}
    assert not checks["(a)"].passed and checks["(a)"].value > 0
    assert not checks["(c)"].passed and not checks["(d)"].passed
    assert checks["(b)"].passed  # the leak does not hide the latents' path
    assert run_verify(cfg, _leaky) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_cli_exit_code(backbone_cache, data_cache, tmp_path, capsys):
    assert main(["verify", *tiny_overrides(backbone_cache, data_cache, tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 4 and "FAIL" not in out


# ----------------------------------------------------------------------------- inspect
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, backbone_cache, data_cache):
    from livr.training.train import train_worker

    tmp = tmp_path_factory.mktemp("inspect_run")
    cfg = _cfg(backbone_cache, data_cache, tmp, name="livr", **{
        "train.stage1_steps": 2, "train.stage2_steps": 2, "optim.lr": 1e-2, "data.train_size": 8,
        "data.val_size": 4, "data.test_size": 4, "tracking.experiment": "insight"})
    train_worker(cfg)
    return cfg


def test_inspect_writes_metrics_heatmaps_and_logs_to_mlflow(trained_run):
    cfg = trained_run
    run = cfg.run_dir
    assert main(["inspect", "--run", run, "--limit", "4", "--heatmaps", "2"]) == 0
    out = os.path.join(run, "inspect")
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    for key in ("answer_to_latent_mass", "answer_to_image_mass", "answer_to_text_mass", "acc", "acc_no_latents",
                "acc_bottleneck"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["answer_to_latent_mass"] > 0 and m["n"] == 4 and m["num_latents"] == 4
    with open(os.path.join(out, "attention_per_layer.csv")) as f:
        layers = list(csv.DictReader(f))
    assert len(layers) == 2  # the tiny LM's layers
    for row in layers:
        total = sum(float(row[f"answer_to_{g}"]) for g in ("latent", "image", "text", "answer"))
        assert total == pytest.approx(1.0, abs=1e-4)
    assert m["heatmaps"] == ["latent_heatmap_0.png", "latent_heatmap_1.png", "latent_heatmaps.png"]
    for name in m["heatmaps"]:
        with Image.open(os.path.join(out, name)) as im:
            assert im.format == "PNG" and im.size[0] > 200

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    with open(os.path.join(run, "mlflow_run_id")) as f:
        run_id = f.read().strip()
    metrics = client.get_run(run_id).data.metrics
    for key in ("inspect/answer_to_latent_mass", "inspect/answer_to_image_mass", "inspect/acc_no_latents",
                "inspect/acc_bottleneck"):
        assert metrics[key] == pytest.approx(m[key.split("/")[1]]), key
    per_layer = client.get_metric_history(run_id, "inspect/layer/answer_to_latent_mass")
    assert sorted(h.step for h in per_layer) == [0, 1]
    files = {os.path.basename(a.path) for a in client.list_artifacts(run_id, "inspect")}
    assert {"metrics.json", "attention_per_layer.csv", "latent_heatmap_0.png"} <= files


def test_prompt_without_latents_keeps_the_delimiter(trained_run):
    from livr.data.synthetic import generate_task
    from livr.insight.inspect import without_latents
    from livr.training.runs import load_run

    _, lm = load_run(trained_run.run_dir)
    row = generate_task("Counting", 1, seed=0)[0]
    ids = without_latents(lm.builder).encode(row, with_answer=False)["input_ids"].tolist()
    assert ids[-1] == lm.latent_ids[-1] and not set(lm.latent_ids[:-1]) & set(ids)
    full = lm.builder.encode(row, with_answer=False)["input_ids"].tolist()
    assert len(full) == len(ids) + len(lm.latent_ids) - 1


# ----------------------------------------------------------------------------- report --experiment
def _log_run(tmp_path, name, mode, k, lr, acc, finished=True, zero_shot=None, extra=None):
    from livr.tracking.tracker import Tracker

    cfg = load_config(None, [f"name={name}", f"output_dir={tmp_path / 'runs'}", f"train.mode={mode}",
                             f"latents.num_latents={k}", f"optim.lr={lr}", "tracking.experiment=sweep",
                             f"tracking.uri=sqlite:///{tmp_path}/report.db",
                             f"tracking.artifact_location={tmp_path / 'art'}"])
    tracker = Tracker(cfg, 0, cfg.run_dir)
    tracker.log_metrics({"test_accuracy": sum(acc.values()) / len(acc), **{f"test/{t}": a for t, a in acc.items()},
                         "stage1/loss": 1.0, **(extra or {})}, 10)
    if zero_shot:
        with open(os.path.join(cfg.run_dir, "eval_zero_shot.json"), "w") as f:
            json.dump({"results": {"test": zero_shot if "accuracy" in zero_shot else {"accuracy": zero_shot}}}, f)
        tracker.log_run_dir(cfg.run_dir)
    if finished:
        tracker.end()
    return cfg


def test_report_experiment_reproduces_table_and_sweep(tmp_path, capsys):
    _log_run(tmp_path, "sft", "sft", 0, 1e-4, {"Counting": 0.6, "Jigsaw": 0.5}, zero_shot={"Counting": 0.3, "Jigsaw": 0.25})
    _log_run(tmp_path, "livr-k4", "livr", 4, 1e-4, {"Counting": 0.7, "Jigsaw": 0.6})
    _log_run(tmp_path, "livr-k8", "livr", 8, 1e-4, {"Counting": 0.8, "Jigsaw": 0.7})
    _log_run(tmp_path, "livr-k8-hi", "livr", 8, 3e-4, {"Counting": 0.9, "Jigsaw": 0.4})
    _log_run(tmp_path, "running", "livr", 16, 1e-4, {"Counting": 0.1, "Jigsaw": 0.1}, finished=False)
    out = tmp_path / "rep" / "report.md"
    assert main(["report", "--experiment", "sweep", "--tracking-uri", f"sqlite:///{tmp_path}/report.db",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert lines["zero-shot"] == "| zero-shot | 30.00 | 25.00 | 27.50 |"
    assert lines["SFT"] == "| SFT | 60.00 | 50.00 | 55.00 |"
    assert lines["LIVR (K=4)"] == "| LIVR (K=4) | 70.00 | 60.00 | 65.00 |"
    assert lines["LIVR (K=8) · livr-k8"] == "| LIVR (K=8) · livr-k8 | 80.00 | 70.00 | 75.00 |"
    assert lines["LIVR (K=8) · livr-k8-hi"] == "| LIVR (K=8) · livr-k8-hi | 90.00 | 40.00 | 65.00 |"
    assert "running" not in text and "K=16" not in text  # unfinished runs are left out
    assert text.index("| method | Count | Jigsaw | mean |") < text.index("### Sweep")
    assert "| 8 | 75.00 | 65.00 |" in text  # the K x lr grid: K=8 at lr 1e-4 and 3e-4
    assert out.read_text().strip() == text.strip()
    with Image.open(tmp_path / "rep" / "report_sweep.png") as im:
        assert im.format == "PNG"


def test_report_experiment_under_the_second_parser(tmp_path, capsys):
    """MLflow holds the configured parser's metrics as test/<task> and the second parser's as test_match/<task>
    (livr.training.evaluate.eval_metrics); `livr report --parser match` reads the latter, the default the former."""
    zs = {"accuracy": {"Counting": 0.3}, "parser": "blink", "accuracy_by_parser": {"match": {"Counting": 0.4}}}
    _log_run(tmp_path, "sft", "sft", 0, 1e-4, {"Counting": 0.6}, zero_shot=zs,
             extra={"test_match_accuracy": 0.7, "test_match/Counting": 0.7})
    uri = ["--experiment", "sweep", "--tracking-uri", f"sqlite:///{tmp_path}/report.db"]
    assert main(["report", *uri]) == 0
    text = capsys.readouterr().out
    assert "| SFT | 60.00 | 60.00 |" in text and "| zero-shot | 30.00 | 30.00 |" in text
    assert main(["report", *uri, "--parser", "match"]) == 0
    text = capsys.readouterr().out
    assert "| SFT | 70.00 | 70.00 |" in text and "| zero-shot | 40.00 | 40.00 |" in text and "parser match" in text
    assert main(["report", *uri, "--parser", "blink"]) == 0  # the runs' own eval.parser: test/<task>
    assert "| SFT | 60.00 | 60.00 |" in capsys.readouterr().out


def test_report_run_dirs_still_work(tmp_path, capsys):
    from livr.training.evaluate import write_eval

    run = tmp_path / "r"
    write_eval(str(run / "eval.json"), {"test": {"accuracy": {"Counting": 0.5}}}, meta={"mode": "livr", "num_latents": 4})
    assert main(["report", str(run)]) == 0
    assert "| LIVR (K=4) | 50.00 | 50.00 |" in capsys.readouterr().out
    assert main(["report"]) == 2


def test_heatmap_grid_matches_image_tokens(trained_run):
    from livr.data.synthetic import generate_task
    from livr.insight.inspect import image_grids
    from livr.training.runs import load_run

    _, lm = load_run(trained_run.run_dir)
    item = lm.builder.encode(generate_task("Counting", 1, seed=0, image_size=112)[0])
    (positions, gh, gw), = image_grids(lm, item)
    assert (gh, gw) == (4, 4) and len(positions) == int((item["groups"] == IMAGE).sum())
    assert torch.equal(item["input_ids"][positions], torch.full((16,), lm.builder.image_id))
