"""A run's saved artifacts reproduce its model exactly, through livr and through stock PEFT, for every registered
family: all vocabulary columns of the logits, the latent tokens' columns included (an untied head's latent rows are
part of the adapter)."""
import json
import os

import pytest
import torch
from conftest import tiny_overrides

from livr.backbones import TINY_PRESETS, load_backbone
from livr.config import load_config, save_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.model.build import build_model
from livr.training.checkpoint import save_run_artifacts
from livr.training.runs import load_run


def _as_if_trained(lm, seed: int = 5) -> None:
    """Move every trainable tensor (LoRA, the latent rows) off its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module", params=TINY_PRESETS)
def saved_run(request, tmp_path_factory, backbone_cache, data_cache):
    tmp = tmp_path_factory.mktemp("reload")
    cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp, name="r",
                                           **{"model.backbone": request.param}))
    os.makedirs(cfg.run_dir)
    save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    lm = build_model(cfg)
    _as_if_trained(lm)
    lm.model.eval()
    save_run_artifacts(lm, cfg.run_dir)
    rows = generate_task("Counting", 2, seed=9)
    batch = collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = lm.forward(batch, bottleneck=False)
    return cfg, lm, batch, logits


def test_the_head_rows_of_the_latents_are_frozen_and_saved(saved_run):
    cfg, lm, _, _ = saved_run
    tied = lm.model.get_base_model().config.tie_word_embeddings
    names = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert not any("lm_head" in n for n in names), "the output head must not train"
    from safetensors.torch import load_file

    saved = load_file(os.path.join(cfg.run_dir, "adapter", "adapter_model.safetensors"))
    head_keys = [k for k in saved if "lm_head" in k]
    if tied:
        assert not head_keys
    else:
        (key,) = head_keys
        want = lm.model.get_base_model().lm_head.weight[lm.latent_ids]  # the base head's rows (livr's seeded init)
        assert saved[key].shape == (len(lm.latent_ids), want.shape[1]) and torch.equal(saved[key], want.detach())


def test_livr_reload_reproduces_every_logit(saved_run):
    cfg, _, batch, logits = saved_run
    _, reloaded = load_run(cfg.run_dir)
    with torch.no_grad():
        again = reloaded.forward(batch, bottleneck=False)
    assert torch.equal(again, logits)


def test_stock_peft_reload_reproduces_every_logit(saved_run):
    """The README's recipe: the base resized to vocab.json's size, then PeftModel.from_pretrained; no livr code
    touches the weights."""
    cfg, lm, batch, logits = saved_run
    bb = load_backbone(cfg.model.backbone, cache_dir=cfg.model.cache_dir)
    out = stock_peft_logits(bb.model, cfg.run_dir, batch, lm.family.forward_keys)
    assert out.shape == logits.shape
    assert torch.equal(out, logits), f"max |Δ| {(out - logits).abs().max():.3g}"


def stock_peft_logits(base, run_dir: str, batch: dict, forward_keys) -> torch.Tensor:
    """The README's recipe on a freshly loaded base model: resize to vocab.json's size, PeftModel.from_pretrained."""
    from peft import PeftModel

    with open(os.path.join(run_dir, "vocab.json")) as f:
        base.resize_token_embeddings(json.load(f)["vocab"])
    stock = PeftModel.from_pretrained(base, os.path.join(run_dir, "adapter")).eval()
    mm = {k: batch[k] for k in forward_keys if k in batch}
    with torch.no_grad():
        return stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **mm).logits


# Families whose stock processor builds a video processor (needs torchvision) and has no image-only stock equivalent:
# their export loads with AutoProcessor.from_pretrained(DIR, trust_remote_code=True) (DIR/processing_livr_export.py).
# Every other family loads with plain AutoProcessor.from_pretrained(DIR), torchvision or not.
REMOTE_PROCESSOR = {"llava_onevision"}


def stock_answers(stock, out_dir: str, lm, rows, max_new_tokens: int = 6, trust_remote_code: bool = False) -> list[str]:
    """Greedy answers of an exported directory through stock transformers only, in a process that never imports
    livr (tests/stock_answers.py, run by `stock`, the session's stock_transformers fixture): AutoModelForImageTextToText,
    AutoProcessor (plain, as the README writes it, except for REMOTE_PROCESSOR families), the exported chat template
    (it must end with the latents after the assistant header), generate."""
    import tempfile

    from livr.data.prompts import format_prompt
    from livr.data.sequence import images_of

    work = tempfile.mkdtemp(dir=os.path.dirname(out_dir))
    spec_rows = []
    for i, row in enumerate(rows):
        paths = []
        for j, image in enumerate(images_of(row)):
            paths.append(os.path.join(work, f"{i}_{j}.png"))
            image.save(paths[-1])  # lossless: the same pixels
        spec_rows.append({"prompt": format_prompt(row), "images": paths})
    latent_text = "".join(lm.tokenizer.convert_ids_to_tokens(lm.latent_ids))
    spec = {"dir": out_dir, "trust_remote_code": trust_remote_code, "max_new_tokens": max_new_tokens,
            "processor_trust_remote_code": lm.family.name in REMOTE_PROCESSOR,
            "expect_prompt_end": lm.family.assistant_header + latent_text, "rows": spec_rows}
    with open(os.path.join(work, "spec.json"), "w") as f:
        json.dump(spec, f)
    rc, out, err = stock.run(os.path.join(work, "spec.json"))
    assert rc == 0, err[-3000:] + "\n".join(out)[-1000:]
    line = next((ln for ln in out if ln.startswith("stock answers: ")), None)
    assert line, "\n".join(out)[-2000:] + err[-2000:]
    return json.loads(line[len("stock answers: "):])["answers"]


def test_export_runs_in_stock_transformers_with_livr_eval_answers(saved_run, stock_transformers, tmp_path):
    """`livr export`: stock AutoModelForImageTextToText + the exported chat template (which appends the latents)
    + generate give livr eval's answers; the merged weights carry the latent rows; --adapter-only copies files."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from livr.cli import main
    from livr.training.evaluate import evaluate_rows

    cfg, lm, _, _ = saved_run
    client = MlflowClient(cfg.tracking.uri)  # the run's MLflow record, as training leaves it
    run_id = client.create_run(client.create_experiment(f"export-{lm.family.name}",
                                                        artifact_location=str(tmp_path / "mlartifacts"))).info.run_id
    (tmp_path / "mlflow_run_id").write_text(run_id)
    os.replace(tmp_path / "mlflow_run_id", os.path.join(cfg.run_dir, "mlflow_run_id"))
    out = str(tmp_path / "export")
    assert main(["export", "--run", cfg.run_dir, "--out", out]) == 0
    logged = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {"export/config.json", "export/chat_template.jinja", "export/livr_export.json"} <= logged, logged
    rows = generate_task("Counting", 3, seed=4) + generate_task("Jigsaw", 2, seed=4)
    want = [p["output"] for p in evaluate_rows(lm, rows, batch_size=2, max_new_tokens=6)["predictions"]]

    assert stock_answers(stock_transformers, out, lm, rows) == want

    merged = {k: v for f in os.listdir(out) if f.endswith(".safetensors") for k, v in load_file(os.path.join(out, f)).items()}
    emb = next(v for k, v in merged.items() if k.endswith("embed_tokens.weight"))
    assert torch.equal(emb[lm.latent_ids], load_file(os.path.join(cfg.run_dir, "latents.safetensors"))["rows"])
    with open(os.path.join(out, "livr_export.json")) as f:
        assert json.load(f)["num_latents"] == cfg.latents.num_latents

    only = str(tmp_path / "adapter-only")
    assert main(["export", "--run", cfg.run_dir, "--out", only, "--adapter-only"]) == 0
    assert sorted(os.listdir(only)) == sorted(["adapter", "latents.safetensors", "tokenizer", "vocab.json", "config.yaml"])
