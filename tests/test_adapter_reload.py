"""A run's saved artifacts reproduce its model exactly, through livr and through stock PEFT, for every registered
family: all vocabulary columns of the logits, the latent tokens' columns included (an untied head's latent rows are
part of the adapter)."""
import json
import os

import pytest
import torch
from conftest import tiny_overrides

from livr.backbones import TINY_PRESETS, load_backbone
from livr.checkpoint import save_run_artifacts
from livr.config import load_config, save_config
from livr.data.synthetic import generate_task
from livr.model import build_model
from livr.runs import load_run
from livr.sequence import collate


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
    from peft import PeftModel

    cfg, lm, batch, logits = saved_run
    bb = load_backbone(cfg.model.backbone, cache_dir=cfg.model.cache_dir)
    with open(os.path.join(cfg.run_dir, "vocab.json")) as f:
        vocab = json.load(f)
    bb.model.resize_token_embeddings(vocab["vocab"])
    stock = PeftModel.from_pretrained(bb.model, os.path.join(cfg.run_dir, "adapter")).eval()
    mm = {k: batch[k] for k in lm.family.forward_keys if k in batch}
    with torch.no_grad():
        out = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **mm).logits
    assert out.shape == logits.shape
    assert torch.equal(out, logits), f"max |Δ| {(out - logits).abs().max():.3g}"
