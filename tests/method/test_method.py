"""The method's specification (LIVR_SPEC §1–2): what can see what, what trains, what stays frozen."""
import pytest
import torch
from conftest import tiny_overrides

from livr.backbones import TINY_PRESETS
from livr.config import load_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.method.groups import ANSWER, IMAGE, LATENT, PAD, PROMPT, TEXT
from livr.method.mask import bottleneck_allowed
from livr.model.build import answer_loss, build_model

FAMILIES = list(TINY_PRESETS)  # every registered family


# ----------------------------------------------------------------------------- the mask alone
def test_bottleneck_mask_rules():
    g = torch.tensor([[TEXT, IMAGE, IMAGE, PROMPT, LATENT, LATENT, ANSWER, ANSWER, PAD, PAD]])
    a = bottleneck_allowed(g)[0]
    n = g.shape[1]
    for i in range(n):
        for j in range(n):
            gi, gj = g[0, i].item(), g[0, j].item()
            expect = j <= i and gj != PAD and not (gi in (PROMPT, ANSWER) and gj == IMAGE)
            if gi == PAD and i == j:
                expect = True  # pad rows keep their diagonal: never a fully masked row
            assert a[i, j].item() == expect, (i, j)
    assert a[4, 1] and a[5, 2], "latents see the image"
    assert not a[6, 1] and not a[3, 2], "answer and prompt are blind to the image"
    assert a.any(-1).all(), "no fully masked row"


def _cfg(backbone_cache, data_cache, tmp_path, backbone, **extra):
    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{"model.backbone": backbone, **extra}))


def _pair(lm, task="Counting", n=2):
    """Two examples that differ only in their image(s)."""
    rows = generate_task(task, n, seed=3, split="val")
    a = dict(rows[0])
    b = dict(rows[0])
    for k in ("image_1", "image_2", "image_3", "image_4"):
        if rows[1].get(k) is not None and a.get(k) is not None:
            b[k] = rows[1][k].resize(a[k].size)
    return collate([lm.builder.encode(a)], lm.tokenizer.pad_token_id), collate([lm.builder.encode(b)], lm.tokenizer.pad_token_id)


def _answer_positions(batch):
    """Positions whose logits predict answer tokens (labels shifted by one)."""
    return (batch["labels"][0, 1:] != -100).nonzero().flatten()


# ----------------------------------------------------------------------------- leak-proofness
@pytest.mark.parametrize("backbone", FAMILIES)
def test_stage1_no_leak_without_latents(backbone, backbone_cache, data_cache, tmp_path):
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, backbone, **{"latents.num_latents": 0}))
    lm.model.eval()
    a, b = _pair(lm)
    pos = _answer_positions(a)
    with torch.no_grad():
        out_a = lm.model(**lm.model_inputs(a, True), output_hidden_states=True)
        out_b = lm.model(**lm.model_inputs(b, True), output_hidden_states=True)
        assert not torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(out_a.logits[0, pos], out_b.logits[0, pos]), "answer logits depend on the image"
        prompt = (a["groups"][0] == PROMPT).nonzero().flatten()
        for ha, hb in zip(out_a.hidden_states, out_b.hidden_states):
            assert torch.equal(ha[0, prompt], hb[0, prompt]), "prompt hidden states depend on the image"
        # the plain causal path (Stage 2) does see the image
        plain_a, plain_b = lm.forward(a, bottleneck=False), lm.forward(b, bottleneck=False)
        assert not torch.allclose(plain_a[0, pos], plain_b[0, pos])


@pytest.mark.parametrize("backbone", FAMILIES)
def test_stage1_latents_carry_the_image(backbone, backbone_cache, data_cache, tmp_path):
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, backbone, **{"latents.num_latents": 4}))
    lm.model.eval()
    a, b = _pair(lm)
    pos = _answer_positions(a)
    # (a) no logit that predicts an answer token is computed at a latent or image position: from the raw ids,
    # they all sit at or after the delimiter, none on a latent or image token
    ids = a["input_ids"][0]
    tok = lm.tokenizer
    delimiter = ids.tolist().index(tok.convert_tokens_to_ids("<livr_latent_end>"))
    latent_or_image = tok.convert_tokens_to_ids([f"<livr_latent_{i}>" for i in range(4)] + [lm.family.image_token])
    assert len(pos) > 0 and (pos >= delimiter).all() and not torch.isin(ids[pos], torch.tensor(latent_or_image)).any()
    with torch.no_grad():
        la, lb = lm.forward(a, bottleneck=True), lm.forward(b, bottleneck=True)
    assert (la[0, pos] - lb[0, pos]).abs().max() > 1e-6, "with K > 0 the answer must see the image via the latents"


@pytest.mark.parametrize("backbone", FAMILIES)
def test_stage1_gradient_reaches_pixels_only_through_latents(backbone, backbone_cache, data_cache, tmp_path):
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, backbone, **{"latents.num_latents": 4}))
    a, _ = _pair(lm)

    def pixel_grad(batch):
        px = batch["pixel_values"].clone().requires_grad_(True)
        loss = answer_loss(lm.forward({**batch, "pixel_values": px}, bottleneck=True), batch["labels"])
        (g,) = torch.autograd.grad(loss, px, allow_unused=True)
        return torch.zeros_like(px) if g is None else g

    assert pixel_grad(a).abs().sum() > 0
    cut = dict(a)
    cut["groups"] = torch.where(a["groups"] == LATENT, PROMPT, a["groups"])  # latents blinded too
    assert pixel_grad(cut).abs().sum() == 0


@pytest.mark.parametrize("backbone", FAMILIES)
def test_four_d_path_equals_plain_without_blocking(backbone, backbone_cache, data_cache, tmp_path):
    """The 4-D mask + explicit positions reproduce the plain model when nothing is blocked (Stage 2 = plain)."""
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, backbone))
    lm.model.eval()
    rows = generate_task("Counting", 2, seed=5)
    batch = collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id)
    g = batch["groups"]  # nothing blocked: every row is text, image tokens stay image tokens (Gemma 3's own rule)
    unblocked = {**batch, "groups": torch.where((g == PAD) | (g == IMAGE), g, TEXT)}
    with torch.no_grad():
        plain = lm.forward(batch, bottleneck=False)
        four_d = lm.forward(unblocked, bottleneck=True)
        base = lm.model.get_base_model()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          **{k: batch[k] for k in lm.family.forward_keys if k in batch}).logits
    valid = batch["attention_mask"].bool()
    assert torch.allclose(plain[valid], four_d[valid], atol=1e-5)
    assert torch.allclose(plain[valid], base[valid], atol=1e-6)  # fresh LoRA (B = 0) is the base model


@pytest.mark.parametrize("bottleneck", [True, False])
def test_padding_gives_per_example_losses(bottleneck, backbone_cache, data_cache, tmp_path):
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, "tiny-qwen2.5-vl"))
    lm.model.eval()
    rows = generate_task("Counting", 2, seed=1) + generate_task("Jigsaw", 1, seed=1)  # 1 and 3 images
    items = [lm.builder.encode(r) for r in rows]
    assert len({it["input_ids"].shape[0] for it in items}) > 1
    pad = lm.tokenizer.pad_token_id
    with torch.no_grad():
        batch = collate(items, pad)
        together = answer_loss(lm.forward(batch, bottleneck), batch["labels"], per_example=True)
        alone = torch.cat([answer_loss(lm.forward(collate([it], pad), bottleneck), it["labels"][None], per_example=True)
                           for it in items])
    assert torch.isfinite(together).all()
    assert torch.allclose(together, alone, atol=1e-5), (together, alone)


# ----------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("backbone", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_only_lora_and_latent_rows_change(backbone, backbone_cache, data_cache, tmp_path):
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, backbone, **{"latents.num_latents": 4}))
    base = lm.model.get_base_model()

    def unwrap(mod):  # the base table under PEFT's trainable-tokens wrapper (the head too when tied)
        return mod.token_adapter.base_layer.weight if hasattr(mod, "token_adapter") else mod.weight

    def table():
        return unwrap(base.get_input_embeddings())

    def head():
        return unwrap(base.get_output_embeddings())

    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    emb_before = table().detach().clone()
    head_before = head().detach().clone()
    from livr.model.build import param_groups

    groups = param_groups(lm.model, 0.01)
    assert all(g["weight_decay"] == 0.0 for g in groups if any("trainable_tokens" in n for n, p in lm.model.named_parameters()
                                                                if any(p is q for q in g["params"])))
    opt = torch.optim.AdamW(groups, lr=1e-2)
    rows = generate_task("Counting", 4, seed=2)
    batch = collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id)
    for bottleneck in (True, False):
        answer_loss(lm.forward(batch, bottleneck), batch["labels"]).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or "trainable_tokens" in n for n in changed), sorted(changed)[:5]
    assert any("trainable_tokens" in n for n in changed) and any("lora_B" in n for n in changed)
    # the optimizer holds state only for trainable tensors: LoRA and the K+1 latent rows
    n_state = sum(s["exp_avg"].numel() for s in opt.state.values())
    assert n_state == sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    assert torch.equal(table(), emb_before), "base embedding rows must stay bit-identical"
    assert torch.equal(head(), head_before), "output head must stay bit-identical"
    # the effective latent rows did move
    emb = lm.model.get_input_embeddings()
    ids = torch.tensor(lm.latent_ids)
    assert not torch.equal(emb(ids), emb_before[ids])
    other = torch.tensor([0, 1, 2, lm.tokenizer.pad_token_id])
    assert torch.equal(emb(other), emb_before[other])


# ----------------------------------------------------------------------------- generation
def _model_positions(lm, batch):
    """The position ids the backbone computes by itself on the plain path, as its language model receives them
    (Qwen's mRoPE [3, B, L]); the LLaVA LM gets none and counts 0..L-1."""
    got = {}
    lang = lm.model.get_base_model().model.language_model
    handle = lang.register_forward_pre_hook(lambda m, a, k: got.update(k), with_kwargs=True)
    lm.model(**lm.model_inputs(batch, False))
    handle.remove()
    pos = got.get("position_ids")
    return pos if pos is not None else torch.arange(batch["input_ids"].shape[1])[None]


@pytest.mark.parametrize("backbone", FAMILIES)
@pytest.mark.parametrize("bottleneck", [False, True])
def test_cached_generation_matches_full_recompute(backbone, bottleneck, backbone_cache, data_cache, tmp_path):
    """The KV-cached decode (prefix once, one token per step) equals re-running the whole sequence."""
    from livr.training.evaluate import generate

    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, backbone, **{"latents.num_latents": 3}))
    lm.model.eval()
    rows = generate_task("Counting", 1, seed=4) + generate_task("Visual_Similarity", 1, seed=4)  # 1 and 3 images
    items = [lm.builder.encode(r, with_answer=False) for r in rows]
    assert all(it["input_ids"][-1].item() == lm.latent_ids[-1] for it in items), "prompt ends with the delimiter"
    head_rows = []  # positions the LM head sees in each generate forward: one per row, never the prompt's L
    hook = lm.model.get_output_embeddings().register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:2]))
    cached = generate(lm, items, bottleneck=bottleneck, max_new_tokens=4)
    hook.remove()
    assert head_rows and all(s == (len(items), 1) for s in head_rows), head_rows
    eos = lm.tokenizer.convert_tokens_to_ids(lm.family.end_of_turn)
    for it, got in zip(items, cached):
        seq = {k: v for k, v in it.items() if k != "position_ids"}  # the reference takes the model's own positions
        tokens = []
        for _ in range(4):
            batch = collate([seq], lm.tokenizer.pad_token_id)
            with torch.no_grad():
                batch["position_ids"] = _model_positions(lm, batch)
                nxt = lm.forward(batch, bottleneck)[0, -1].argmax().item()
            if nxt == eos:
                break
            tokens.append(nxt)
            seq = {**seq, "input_ids": torch.cat([seq["input_ids"], torch.tensor([nxt])]),
                   "labels": torch.cat([seq["labels"], torch.tensor([-100])]),
                   "groups": torch.cat([seq["groups"], torch.tensor([ANSWER])])}
            if "mm_token_type_ids" in seq:
                seq["mm_token_type_ids"] = torch.cat([seq["mm_token_type_ids"], torch.tensor([0])])
        assert got == lm.tokenizer.decode(tokens, skip_special_tokens=True)


def test_lora_targets_select_projections(backbone_cache, data_cache, tmp_path):
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, "tiny-llava-onevision", **{"lora.targets": "[q_proj, down_proj]"}))
    names = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, p in lm.model.named_parameters() if "lora_A" in n}
    assert names == {"q_proj", "down_proj"}
    assert all("language_model" in n for n, p in lm.model.named_parameters() if "lora_" in n)


def test_gradient_checkpointing_and_stage_attention_switch(backbone_cache, data_cache, tmp_path):
    """Options of the model builder: checkpointed layers give the same loss and gradients; the attention
    implementation can change between stages (eager for Stage 1, another for Stage 2)."""
    rows = generate_task("Counting", 2, seed=6)
    out = {}
    for ckpt in (False, True):
        lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, "tiny-qwen2.5-vl",
                              **{"model.gradient_checkpointing": ckpt, "lora.dropout": 0.0}))
        lm.model.train()
        batch = collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id)
        loss = answer_loss(lm.forward(batch, True), batch["labels"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}
        out[ckpt] = (loss.item(), grads)
    assert out[True][0] == pytest.approx(out[False][0], abs=1e-6)
    assert out[True][1].keys() == out[False][1].keys() and out[True][1]
    diffs = {n: (out[True][1][n] - out[False][1][n]).abs().max().item() for n in out[True][1]}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda x: -x[1])[:3]
    lm.model.eval()
    with torch.no_grad():
        sdpa = lm.forward(batch, True)
        lm.set_attn_implementation("eager")
        assert lm.model.get_base_model().config._attn_implementation == "eager"
        eager = lm.forward(batch, True)
    assert torch.allclose(sdpa, eager, atol=1e-4)
