"""train_worker end to end on a tiny backbone: artifacts, reload, stock PEFT, MLflow, resume, bad input."""
import json
import os

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from livr.config import load_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.training.checkpoint import CheckpointError
from livr.training.runs import load_run
from livr.training.train import train_worker


def _json(path):
    with open(path) as f:
        return json.load(f)


def _cfg(backbone_cache, data_cache, tmp_path, **extra):
    extra = {"train.stage1_steps": 3, "train.stage2_steps": 3, "train.sft_steps": 4, "optim.lr": 1e-2, **extra}
    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **extra))


@pytest.fixture(scope="module")
def livr_run(tmp_path_factory, backbone_cache, data_cache):
    tmp = tmp_path_factory.mktemp("livr_run")
    cfg = _cfg(backbone_cache, data_cache, tmp, name="livr", **{"model.backbone": "tiny-qwen3-vl"})
    return cfg, train_worker(cfg), tmp


def test_run_directory_and_reload_reproduce_logits(livr_run):
    cfg, result, _ = livr_run
    run = cfg.run_dir
    for f in ("config.yaml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "latents.safetensors",
              "tokenizer/tokenizer.json", "eval.json", "checkpoints/last/state.json"):
        assert os.path.exists(os.path.join(run, f)), f
    assert result["global_step"] == 6
    ev = _json(os.path.join(run, "eval.json"))
    assert ev["mode"] == "livr" and set(ev["results"]["test"]["accuracy"]) == {"Counting"}
    assert len(ev["history"]) == 2  # one validation per stage (steps < one epoch)

    # the saved config alone reproduces the run's model: reload and compare logits exactly
    from livr.model.build import build_model
    from livr.training.checkpoint import load_trainable_state

    trained = build_model(cfg)
    best = os.path.join(run, "checkpoints", "best.safetensors")
    load_trainable_state(trained.model, load_file(best), best)
    cfg2, reloaded = load_run(run)
    assert cfg2 == cfg
    rows = generate_task("Counting", 2, seed=9)
    batch = collate([reloaded.builder.encode(r) for r in rows], reloaded.tokenizer.pad_token_id)
    trained.model.eval()
    with torch.no_grad():
        a = trained.forward(batch, bottleneck=False)
        b = reloaded.forward(batch, bottleneck=False)
    assert torch.equal(a, b)
    lat = load_file(os.path.join(run, "latents.safetensors"))
    assert torch.equal(lat["latent_ids"], torch.tensor(reloaded.latent_ids))
    emb = reloaded.model.get_input_embeddings()
    assert torch.equal(emb(lat["latent_ids"]), lat["rows"])

    # stock PEFT: base resized to the run's vocabulary, then PeftModel.from_pretrained
    from peft import PeftModel

    from livr.backbones import load_backbone

    bb = load_backbone(cfg.model.backbone, cache_dir=cfg.model.cache_dir)
    vocab = _json(os.path.join(run, "vocab.json"))
    bb.model.resize_token_embeddings(vocab["vocab"])
    stock = PeftModel.from_pretrained(bb.model, os.path.join(run, "adapter")).eval()
    mm = {k: batch[k] for k in reloaded.family.forward_keys if k in batch}
    with torch.no_grad():
        c = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **mm).logits
    assert torch.equal(c, b)  # every column, the latent tokens' included (tests/backbones/test_adapter_reload.py: all families)


def test_mlflow_records_params_metrics_artifacts(livr_run, backbone_cache, data_cache):
    cfg, _, tmp = livr_run
    sft = _cfg(backbone_cache, data_cache, tmp, name="sft", **{"model.backbone": "tiny-qwen3-vl", "train.mode": "sft",
                                                               "eval.zero_shot": True})
    train_worker(sft)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"livr", "sft"}
    for name, mode in (("livr", "livr"), ("sft", "sft")):
        r = runs[name]
        assert r.info.status == "FINISHED"
        assert r.data.tags["mode"] == mode and r.data.tags["backbone"] == "tiny-qwen3-vl"
        assert r.data.params["train.mode"] == mode and r.data.params["optim.lr"] == "0.01"
        assert "test_accuracy" in r.data.metrics and "val_accuracy" in r.data.metrics
        assert "test_match_accuracy" in r.data.metrics  # the second parser's, beside eval.parser=blink's
        assert {k[len("test_match/"):] for k in r.data.metrics if k.startswith("test_match/")} == \
            {k[len("test/"):] for k in r.data.metrics if k.startswith("test/")}
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"adapter", "config.yaml", "eval.json"} <= arts
        adapter = {a.path for a in client.list_artifacts(r.info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in adapter
    assert runs["sft"].data.params["latents.num_latents"] == "0"
    stage_metrics = {m.key for m in client.get_metric_history(runs["livr"].info.run_id, "stage1/loss")}
    assert stage_metrics and client.get_metric_history(runs["livr"].info.run_id, "stage2/loss")
    assert len(client.get_metric_history(runs["sft"].info.run_id, "sft/loss")) == 4
    assert os.path.exists(os.path.join(sft.run_dir, "eval_zero_shot.json"))


def test_resume_continues_and_incomplete_checkpoint_is_an_error(backbone_cache, data_cache, tmp_path, monkeypatch):
    cfg = _cfg(backbone_cache, data_cache, tmp_path, name="resume", **{"train.stage1_steps": 2, "train.stage2_steps": 3,
                                                                        "tracking.enabled": False})
    monkeypatch.setenv("LIVR_FAIL_AT_STEP", "4")
    with pytest.raises(RuntimeError, match="injected failure at step 4"):
        train_worker(cfg)
    last = os.path.join(cfg.run_dir, "checkpoints", "last")
    state = _json(os.path.join(last, "state.json"))
    assert state["global_step"] == 2 and state["stage"] == 1 and state["step"] == 0  # Stage 1 done, saved
    monkeypatch.delenv("LIVR_FAIL_AT_STEP")
    # the same command continues from the checkpoint (global step 2, Stage 2), not from zero
    assert train_worker(cfg)["global_step"] == 5
    state = _json(os.path.join(last, "state.json"))
    assert [h["stage"] for h in state["history"]] == ["stage1", "stage2"]
    # an incomplete checkpoint is a clear error, and nothing already written is removed
    os.remove(os.path.join(last, "optimizer.safetensors"))
    kept = sorted(os.listdir(cfg.run_dir))
    with pytest.raises(CheckpointError, match="incomplete.*optimizer.safetensors"):
        train_worker(cfg)
    assert sorted(os.listdir(cfg.run_dir)) == kept
    assert os.path.exists(os.path.join(last, "trainable.safetensors"))


def test_incomplete_run_directory_is_an_error(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(CheckpointError, match="incomplete.*adapter"):
        load_run(str(tmp_path))


def test_unreadable_image_names_the_row(livr_run, backbone_cache, data_cache, tmp_path):
    from livr.data.tasks import DataError
    from livr.model.build import build_model

    cfg, _, _ = livr_run
    lm = build_model(cfg)
    row = dict(generate_task("Counting", 1, seed=0)[0], idx="Counting_bad_7")
    row["image_1"] = b"not an image"
    with pytest.raises(DataError, match="Counting_bad_7"):
        lm.builder.encode(row)
    row = dict(generate_task("Counting", 1, seed=0)[0], idx="Counting_bad_8", answer="(F)")
    with pytest.raises(DataError, match="Counting_bad_8"):
        lm.builder.encode(row)


def test_cli_eval_and_report(livr_run, capsys):
    from livr.cli import main

    cfg, _, _ = livr_run
    capsys.readouterr()
    assert main(["eval", "--run", cfg.run_dir, "--bottleneck"]) == 0
    printed = capsys.readouterr().out  # labelled as livr report labels it; says it was bottlenecked and where it wrote
    assert "| LIVR (K=4) bottlenecked |" in printed and "under the Stage-1 bottleneck mask" in printed
    assert f"wrote {os.path.join(cfg.run_dir, 'eval_test_bottleneck.json')}" in printed
    out = _json(os.path.join(cfg.run_dir, "eval_test_bottleneck.json"))
    assert out["results"]["test"]["n"] == {"Counting": 8}
    assert len(out["results"]["test"]["predictions"]) == 8
    capsys.readouterr()
    assert main(["report", cfg.run_dir]) == 0
    table = capsys.readouterr().out
    acc = _json(os.path.join(cfg.run_dir, "eval.json"))["results"]["test"]["accuracy"]["Counting"]
    assert "| method | Count | mean |" in table and f"| LIVR (K=4) | {100 * acc:.2f} |" in table


def test_rerunning_a_finished_run_says_so_and_evaluates_nothing(livr_run, capsys, monkeypatch):
    from livr.cli import main

    cfg, result, _ = livr_run
    monkeypatch.setenv("LIVR_QUIET", "0")
    stamp = os.stat(os.path.join(cfg.run_dir, "eval.json")).st_mtime_ns
    capsys.readouterr()
    assert main(["train", "--config", os.path.join(cfg.run_dir, "config.yaml")]) == 0  # as documented
    out = capsys.readouterr().out
    assert f"[livr] run already finished: {cfg.run_dir}" in out and "train.resume=false" in out
    assert "resumed from" not in out and "stage 3" not in out
    assert os.stat(os.path.join(cfg.run_dir, "eval.json")).st_mtime_ns == stamp  # not evaluated again
    assert json.loads(out[out.index("{"):out.rindex("}") + 1])["global_step"] == result["global_step"]
    # the same with Ray workers: no worker starts (no Ray at all here), nothing is evaluated again
    from livr.cluster.ray_train import run_distributed

    again = run_distributed(load_config(os.path.join(cfg.run_dir, "config.yaml"), ["distributed.num_workers=2"]))
    assert again["global_step"] == result["global_step"] and again["ray_checkpoint"] is None
    assert "[livr] run already finished" in capsys.readouterr().out
    assert os.stat(os.path.join(cfg.run_dir, "eval.json")).st_mtime_ns == stamp


def test_resume_with_a_different_config_is_an_error(livr_run, backbone_cache, data_cache):
    from livr.config import ConfigError

    cfg, _, tmp = livr_run
    other = _cfg(backbone_cache, data_cache, tmp, name="livr", **{"model.backbone": "tiny-qwen3-vl",
                                                                  "latents.num_latents": 7})
    with pytest.raises(ConfigError, match="different config .*latents.num_latents: 4 there, 7 now"):
        train_worker(other)
    assert _json(os.path.join(cfg.run_dir, "eval.json"))["num_latents"] == 4  # nothing overwritten
