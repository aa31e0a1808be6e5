"""The Stage-1 bottleneck through hybrid (Gated DeltaNet + full attention) backbones: two recurrences per linear layer.

On every hybrid tiny preset, left and right padded, one and three images: with K = 0 the answer logits and every
prompt/answer hidden state in every layer are bit-identical when only the pixels change; with K > 0 the answer
changes and the prompt does not; the loss gradient reaches the pixels only through the latents; positions that read
the stock recurrence equal the stock model; planted mistakes (image positions not muted in one layer's image-blind
recurrence; the convolution input not zeroed) fail the invariance.
"""
import pytest
import torch
from conftest import tiny_overrides

from livr.backbones import FAMILIES, TINY_PRESETS, gated_deltanet
from livr.config import load_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.method.groups import ANSWER, IMAGE, LATENT, PAD, PROMPT
from livr.model.build import answer_loss, build_model

HYBRID = [p for p in TINY_PRESETS if any(f.tiny_preset == p and hasattr(f, "gdn_class") for f in FAMILIES.values())]
_LM: dict = {}


def _lm(backbone_cache, data_cache, tmp_path, backbone, k):
    key = (backbone, k)
    if key not in _LM:
        cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{
            "model.backbone": backbone, "latents.num_latents": k}))
        _LM[key] = build_model(cfg)
        _LM[key].model.eval()
    return _LM[key]


def _batches(lm, side):
    """A padded batch of a 3-image and a 1-image example, and the same batch with only the pixels changed."""
    rows = generate_task("Visual_Similarity", 1, seed=7, split="val") + generate_task("Counting", 1, seed=7, split="val")
    batch = collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id, side)
    gen = torch.Generator().manual_seed(1)
    px = batch["pixel_values"]
    other = {**batch, "pixel_values": px + torch.randn(px.shape, generator=gen, dtype=px.dtype)}
    assert (batch["groups"] == PAD).any() and (batch["groups"][:, 0 if side == "left" else -1] == PAD).any()
    return batch, other


def _run(lm, batch, bottleneck=True):
    with torch.no_grad():
        return lm.model(**lm.model_inputs(batch, bottleneck), output_hidden_states=True, use_cache=False)


def _leak(a, oa, ob) -> float:
    """Max |difference| of the answer logits and of every prompt/answer hidden state (every layer) between two runs."""
    blind, rows = (a["groups"] == PROMPT) | (a["groups"] == ANSWER), _answer_rows(a)
    diffs = [(oa.logits[rows] - ob.logits[rows]).abs().max()]
    diffs += [(ha[blind] - hb[blind]).abs().max() for ha, hb in zip(oa.hidden_states, ob.hidden_states)]
    return max(d.item() for d in diffs)


def _answer_rows(batch):
    rows = torch.zeros_like(batch["labels"], dtype=torch.bool)
    rows[:, :-1] = batch["labels"][:, 1:] != -100
    return rows


@pytest.mark.parametrize("backbone", HYBRID)
@pytest.mark.parametrize("side", ["right", "left"])
def test_k0_answer_and_prompt_are_pixel_invariant_in_every_layer(backbone, side, backbone_cache, data_cache, tmp_path):
    lm = _lm(backbone_cache, data_cache, tmp_path, backbone, 0)
    a, b = _batches(lm, side)
    oa, ob = _run(lm, a), _run(lm, b)
    assert _leak(a, oa, ob) == 0, "answer logits or prompt/answer hidden states depend on the pixels"
    image = a["groups"] == IMAGE
    assert not torch.equal(oa.hidden_states[-1][image], ob.hidden_states[-1][image])  # the pixels did change
    # Stage 2 (the stock model) does carry the image to the answer
    plain_a, plain_b = _run(lm, a, False).logits, _run(lm, b, False).logits
    assert not torch.equal(plain_a[_answer_rows(a)], plain_b[_answer_rows(a)])


@pytest.mark.parametrize("backbone", HYBRID)
@pytest.mark.parametrize("side", ["right", "left"])
def test_latents_carry_the_image_and_the_prompt_stays_blind(backbone, side, backbone_cache, data_cache, tmp_path):
    lm = _lm(backbone_cache, data_cache, tmp_path, backbone, 3)
    a, b = _batches(lm, side)
    oa, ob = _run(lm, a), _run(lm, b)
    rows = _answer_rows(a)
    for ex in range(2):  # each example's answer changes with its own pixels
        assert (oa.logits[ex][rows[ex]] - ob.logits[ex][rows[ex]]).abs().max() > 1e-6
    prompt = a["groups"] == PROMPT
    for ha, hb in zip(oa.hidden_states, ob.hidden_states):
        assert torch.equal(ha[prompt], hb[prompt])


@pytest.mark.parametrize("backbone", HYBRID)
def test_gradient_reaches_the_pixels_only_through_the_latents(backbone, backbone_cache, data_cache, tmp_path):
    lm = _lm(backbone_cache, data_cache, tmp_path, backbone, 3)
    a, _ = _batches(lm, "right")

    def pixel_grad(batch):
        px = batch["pixel_values"].clone().requires_grad_(True)
        loss = answer_loss(lm.forward({**batch, "pixel_values": px}, bottleneck=True), batch["labels"])
        (g,) = torch.autograd.grad(loss, px, allow_unused=True)
        return torch.zeros_like(px) if g is None else g

    assert pixel_grad(a).abs().sum() > 0
    cut = {**a, "groups": torch.where(a["groups"] == LATENT, PROMPT, a["groups"])}  # latents read the blind state
    assert pixel_grad(cut).abs().sum() == 0


@pytest.mark.parametrize("backbone", HYBRID)
def test_stock_recurrence_positions_equal_the_stock_model(backbone, backbone_cache, data_cache, tmp_path):
    """Text, image and latent positions read the stock recurrence: their hidden states are the stock model's."""
    lm = _lm(backbone_cache, data_cache, tmp_path, backbone, 3)
    a, _ = _batches(lm, "left")
    g = a["groups"]
    stage1, plain = _run(lm, a), _run(lm, a, False)
    first_blind = ((g == PROMPT) | (g == ANSWER)).int().argmax(1)
    before = torch.arange(g.shape[1])[None] < first_blind[:, None]  # everything before the first prompt token
    real = before & (g != PAD)
    for h1, h2 in zip(stage1.hidden_states, plain.hidden_states):
        torch.testing.assert_close(h1[real], h2[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("plant", ["state", "conv"])
def test_planted_leaks_fail(plant, monkeypatch, backbone_cache, data_cache, tmp_path):
    """Image positions not muted in one layer's image-blind recurrence, or their convolution input kept: K = 0 then
    leaks the pixels into the answer."""
    lm = _lm(backbone_cache, data_cache, tmp_path, HYBRID[0], 0)
    layer = max(i for i, t in enumerate(lm.model.get_base_model().config.get_text_config().layer_types)
                if t == "linear_attention")
    if plant == "state":
        real = gated_deltanet.mute_images
        monkeypatch.setattr(gated_deltanet, "mute_images", lambda m, beta, decay, image: (beta, decay)
                            if m.layer_idx == layer else real(m, beta, decay, image))
    else:
        monkeypatch.setattr(gated_deltanet, "blind_conv_input", lambda m, qkv, image: qkv)
    a, b = _batches(lm, "right")
    assert _leak(a, _run(lm, a), _run(lm, b)) > 0


@pytest.mark.parametrize("backbone", HYBRID)
@pytest.mark.parametrize("plant", [None, "stock state"])
def test_bottleneck_decode_keeps_the_image_blind_state(backbone, plant, monkeypatch, backbone_cache, data_cache,
                                                       tmp_path):
    """A Stage-1 prefix with a cache, then answer tokens one at a time, equals the full Stage-1 recompute at every
    step (left padded, 1 and 3 images); a cache that kept the stock recurrence's state instead differs."""
    lm = _lm(backbone_cache, data_cache, tmp_path, backbone, 3)
    if plant:
        monkeypatch.setattr(gated_deltanet, "decode_state", lambda qkv, qkv_blind, state, state_blind: (qkv, state))
    rows = generate_task("Visual_Similarity", 1, seed=8) + generate_task("Counting", 1, seed=8)
    batch = collate([lm.builder.encode(r, with_answer=False) for r in rows], lm.tokenizer.pad_token_id, "left")
    fam, model = lm.family, lm.model
    ids, groups = batch["input_ids"], batch["groups"]
    mm = lm.mm_inputs(batch)
    pos = batch["position_ids"]
    new = torch.tensor([lm.tokenizer.convert_tokens_to_ids(["A", "B", "C"])] * 2)
    worst = 0.0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=fam.stage1_mask(model, groups, lm.dtype), position_ids=pos,
                    use_cache=True, **mm)
        for t in range(new.shape[1]):
            ids = torch.cat([ids, new[:, t:t + 1]], 1)
            groups = torch.cat([groups, torch.full_like(groups[:, :1], ANSWER)], 1)
            pos = torch.cat([pos, fam.next_position_ids(pos)], -1)
            out = model(input_ids=new[:, t:t + 1], attention_mask=fam.stage1_mask(model, groups, lm.dtype, rows=1),
                        position_ids=pos[..., -1:], cache=out.cache, use_cache=True)
            full = model(input_ids=ids, attention_mask=fam.stage1_mask(model, groups, lm.dtype), position_ids=pos,
                         use_cache=False, **{**mm, "mm_token_type_ids": torch.nn.functional.pad(
                             mm["mm_token_type_ids"], (0, t + 1))}).logits[:, -1]
            worst = max(worst, (out.logits[:, -1] - full).abs().max().item())
    if plant:
        assert worst > 1e-3
    else:
        assert worst < 5e-5, worst


def test_two_stage_run_trains_saves_resumes(monkeypatch, backbone_cache, data_cache, tmp_path):
    """A two-stage `livr train` of tiny-qwen3.5: killed after Stage 1, resumed into Stage 2 from its checkpoint."""
    import json
    import os

    from livr.training.train import train_worker

    cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, name="hybrid", **{
        "model.backbone": HYBRID[0], "train.stage1_steps": 2, "train.stage2_steps": 2, "tracking.enabled": False}))
    monkeypatch.setenv("LIVR_FAIL_AT_STEP", "3")
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        train_worker(cfg)
    last = os.path.join(cfg.run_dir, "checkpoints", "last")
    with open(os.path.join(last, "state.json")) as f:
        assert json.load(f)["global_step"] == 2
    monkeypatch.delenv("LIVR_FAIL_AT_STEP")
    assert train_worker(cfg)["global_step"] == 4
    with open(os.path.join(last, "state.json")) as f:
        state = json.load(f)
    assert [h["stage"] for h in state["history"]] == ["stage1", "stage2"]
    assert all(torch.isfinite(torch.tensor(h.get("loss", 0.0))) for h in state["history"])
