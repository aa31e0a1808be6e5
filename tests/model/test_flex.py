"""`model.attn_implementation=flex_attention`: the Stage-1 bottleneck as a flex_attention BlockMask (livr/model/flex.py).
Its forward equals SDPA with the additive mask on every plain-causal family, flex really runs (not the fallback),
its token-level rule equals the additive mask's, verify checks it (and fails a leaky one), and Stage-1 training on a
CPU (no flex backward there) is a one-line config error before the model loads."""
import pytest
import torch
from conftest import tiny_overrides

from livr.backbones import FAMILIES, TINY_PRESETS
from livr.backbones.base import Family
from livr.config import ConfigError, load_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.method.groups import PAD
from livr.model import flex
from livr.model.build import build_model

CAUSAL = [p for p in TINY_PRESETS
          if type(next(f for f in FAMILIES.values() if f.tiny_preset == p)).own_allowed is Family.own_allowed]


def _cfg(backbone_cache, data_cache, tmp_path, backbone="tiny-qwen2.5-vl", **extra):
    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "model.backbone": backbone, "model.attn_implementation": "flex_attention", "lora.dropout": 0.0, **extra}))


@pytest.mark.parametrize("backbone", CAUSAL)
def test_flex_stage1_forward_equals_sdpa_with_the_additive_mask(backbone, backbone_cache, data_cache, tmp_path,
                                                                monkeypatch):
    assert len(CAUSAL) >= 3  # Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, backbone))
    lm.model.eval()
    assert lm.attn_implementation() == flex.NAME
    rows = generate_task("Visual_Similarity", 1, seed=3, split="val") + generate_task("Counting", 1, seed=3, split="val")
    batch = collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id)  # 3 images and 1: padded
    calls = []
    real_flex = flex._flex()
    monkeypatch.setattr(flex, "_flex", lambda: lambda *a, **k: calls.append(1) or real_flex(*a, **k))
    with torch.no_grad():
        got = lm.forward(batch, bottleneck=True)
    n_layers = lm.model.get_base_model().config.get_text_config().num_hidden_layers
    assert len(calls) == n_layers, "flex_attention ran in every decoder layer (one BlockMask for all)"
    lm.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = lm.forward(batch, bottleneck=True)
    real = batch["groups"] != PAD
    assert (got - want)[real].abs().max() < 1e-5
    # the BlockMask's token-level rule is the additive mask's, on the real rows
    additive = lm.family.stage1_mask(lm.model, batch["groups"], torch.float32)[:, 0] == 0
    dense = flex.allowed(flex.block_mask(lm.family, batch["groups"]))[:, 0]
    assert torch.equal(dense[real], additive[real])


def test_verify_checks_flex_and_fails_a_leaky_one(backbone_cache, data_cache, tmp_path):
    from torch.nn.attention.flex_attention import create_block_mask

    from livr.insight.verify import verify

    cfg = _cfg(backbone_cache, data_cache, tmp_path)
    checks = verify(cfg)
    assert all(c.passed for c in checks), "\n".join(c.line() for c in checks)
    assert "the same mask via SDPA (no flex_attention backward on CPU)" in checks[3].detail

    def causal_only(groups, dtype):  # the bug: no bottleneck at all
        n = groups.shape[1]
        return create_block_mask(lambda b, h, q, kv: kv <= q, groups.shape[0], None, n, n, device=groups.device)

    leaky = {c.name[:3]: c for c in verify(cfg, mask_fn=causal_only)}
    assert not leaky["(a)"].passed and not leaky["(c)"].passed


def test_flex_stage1_training_on_cpu_is_a_one_line_error_and_gemma_is_refused(backbone_cache, data_cache, tmp_path):
    from livr.training.train import train_worker

    cfg = _cfg(backbone_cache, data_cache, tmp_path, **{"train.stage1_steps": 1, "train.stage2_steps": 1})
    with pytest.raises(ConfigError) as e:
        train_worker(cfg)
    msg = str(e.value)
    assert "model.attn_implementation='flex_attention'" in msg and "CPU" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="family gemma3 has its own attention rules"):
        flex.block_mask(FAMILIES["gemma3"], torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="model.attn_implementation='flash'"):
        load_config(None, ["model.attn_implementation=flash"])
