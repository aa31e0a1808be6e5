"""LIVR_SPEC §1–3 pinned independently of the code under test.

The expected token groups, labels and Stage-1 mask are rebuilt here from the raw token ids (the token
strings are looked up in the tokenizer by name), the loss is a hand-computed shifted cross-entropy, and the
leak properties are checked on multi-image examples for every family. Nothing here calls livr's own
`token_groups`, `bottleneck_allowed` or position functions to produce an expected value.
"""
import json
import math
import os

import pytest
import torch
from conftest import tiny_overrides

from livr.backbones import TINY_PRESETS, resolve_backbone_path
from livr.config import load_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.method.groups import GROUP_NAMES
from livr.method.groups import IMAGE as GROUP_IMAGE
from livr.method.groups import LATENT as GROUP_LATENT
from livr.method.groups import PAD as GROUP_PAD
from livr.method.groups import PROMPT as GROUP_PROMPT
from livr.model.build import answer_loss, build_model

FAMILIES = list(TINY_PRESETS)  # every registered family, through its tiny preset
# What each family's model card / chat template says, written here by hand (not read from livr): the image token,
# the assistant header the latents follow, the end-of-turn token, and the model's own rule for image tokens
# (Gemma 3 attends both ways within each image; its sliding layers also see only the last `sliding_window`
# positions). A newly registered family fails these tests until its facts are written here.
SPEC = {
    "qwen2_5_vl": {"image": "<|image_pad|>", "header": "<|im_start|>assistant\n", "eot": "<|im_end|>"},
    "qwen3_vl": {"image": "<|image_pad|>", "header": "<|im_start|>assistant\n", "eot": "<|im_end|>"},
    "qwen3_vl_moe": {"image": "<|image_pad|>", "header": "<|im_start|>assistant\n", "eot": "<|im_end|>"},
    "llava_onevision": {"image": "<image>", "header": "<|im_start|>assistant\n", "eot": "<|im_end|>"},
    # Qwen3.5's chat template: thinking on by default, so the generation prompt opens a think block
    "qwen3_5": {"image": "<|image_pad|>", "header": "<|im_start|>assistant\n<think>\n", "eot": "<|im_end|>"},
    "qwen3_5_moe": {"image": "<|image_pad|>", "header": "<|im_start|>assistant\n<think>\n", "eot": "<|im_end|>"},
    "gemma3": {"image": "<image_soft_token>", "header": "<start_of_turn>model\n", "eot": "<end_of_turn>",
               "bidirectional_images": True},
}


def spec(backbone: str) -> dict:
    path = resolve_backbone_path(backbone, CACHE["dir"])  # the materialised preset, as build_model loads it
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    assert model_type in SPEC, f"{backbone} ({model_type}): write its chat-format facts into SPEC"
    return SPEC[model_type]


CACHE: dict[str, str] = {}  # the session's backbone cache, set by the autouse fixture below


@pytest.fixture(autouse=True)
def _backbone_dir(backbone_cache):
    CACHE["dir"] = backbone_cache
MULTI_IMAGE = "Visual_Similarity"  # three images per example
TEXT, IMAGE, PROMPT, LATENT, ANSWER, PAD = "text", "image", "prompt", "latent", "answer", "pad"
NAME_OF = {TEXT: "text_before_image", IMAGE: "image", PROMPT: "prompt", LATENT: "latent", ANSWER: "answer",
           PAD: "pad"}  # LIVR_SPEC §2's names


def _cfg(backbone_cache, data_cache, tmp_path, backbone, **extra):
    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{"model.backbone": backbone, **extra}))


def expected_groups(ids: list[int], tok, backbone: str, k: int) -> list[str]:
    """LIVR_SPEC §2 from raw ids: text before the first image | image tokens (all images) | prompt up to the
    first latent | K latents | the delimiter, the answer and end-of-turn are `answer`."""
    image = tok.convert_tokens_to_ids(spec(backbone)["image"])
    latents = set(tok.convert_tokens_to_ids([f"<livr_latent_{i}>" for i in range(k)]))
    end = tok.convert_tokens_to_ids("<livr_latent_end>")
    first_image = ids.index(image)
    delimiter = ids.index(end)
    out = []
    for i, t in enumerate(ids):
        if i < first_image:
            out.append(TEXT)
        elif t == image:
            out.append(IMAGE)
        elif t in latents:
            out.append(LATENT)
        elif i >= delimiter:
            out.append(ANSWER)
        else:
            out.append(PROMPT)
    return out


def expected_allowed(groups: list[str], bidirectional_images: bool = False, window: int | None = None) -> torch.Tensor:
    """The Stage-1 rule (LIVR_SPEC §2) written out for the rows of real tokens: the model's own rule (causal; for
    Gemma 3 also both ways within one image, and for a sliding layer only keys less than `window` behind), AND
    prompt and answer rows never see image columns; pad columns are never visible. (Pad rows are checked apart:
    their output is unused.)"""
    n = len(groups)
    image_no = [0] * n  # k for the tokens of the k-th image
    for i, g in enumerate(groups):
        if g == IMAGE:
            image_no[i] = image_no[i - 1] if i and groups[i - 1] == IMAGE else max(image_no) + 1
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            own = j <= i or (bidirectional_images and image_no[i] > 0 and image_no[i] == image_no[j])
            own = own and (window is None or i - j < window)
            allowed[i, j] = own and groups[j] != PAD and not (groups[i] in (PROMPT, ANSWER) and groups[j] == IMAGE)
    return allowed


def layer_masks(mask, model) -> dict:
    """{layer type: (mask, window)}: a Gemma 3 forward receives one mask per layer type, the others one mask."""
    if not isinstance(mask, dict):
        return {"full_attention": (mask, None)}
    text = model.config.get_text_config()
    return {kind: (m, text.sliding_window if kind == "sliding_attention" else None) for kind, m in mask.items()}


def capture_inputs(lm):
    """Record the keyword arguments the backbone itself receives on every forward."""
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
                     | {"training": module.training})

    handle = lm.model.get_base_model().register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle


def _rows(task, n, seed):
    return generate_task(task, n, seed=seed, split="val")


# ----------------------------------------------------------------------------- sequence layout, labels, mask
@pytest.mark.parametrize("backbone", FAMILIES)
def test_groups_labels_and_mask_from_raw_ids(backbone, backbone_cache, data_cache, tmp_path):
    k = 3
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, backbone, **{"latents.num_latents": k}))
    tok = lm.tokenizer
    rows = _rows(MULTI_IMAGE, 1, seed=11) + _rows("Counting", 1, seed=11)  # 3 images and 1 image: padded batch
    items = [lm.builder.encode(r) for r in rows]
    batch = collate(items, tok.pad_token_id)
    facts = spec(backbone)
    eot = tok.convert_tokens_to_ids(facts["eot"])
    for row, item in zip(rows, items):
        ids = item["input_ids"].tolist()
        letter = row["answer"].strip("()")
        answer = tok(letter, add_special_tokens=False)["input_ids"] + [eot]
        # labels: exactly the answer tokens and end-of-turn, at the end; nothing else carries loss
        n = len(answer)
        assert ids[-n:] == answer and item["labels"][-n:].tolist() == answer
        assert (item["labels"][:-n] == -100).all()
        # the K latents then the delimiter come right before the answer, after the assistant header
        tail = tok.convert_ids_to_tokens(ids[-n - k - 1 : -n])
        assert tail == [f"<livr_latent_{i}>" for i in range(k)] + ["<livr_latent_end>"]
        assert tok.decode(ids[: -n - k - 1]).endswith(facts["header"])
    # the mask the backbone receives in a Stage-1 forward, against the rule applied to groups from raw ids
    calls, handle = capture_inputs(lm)
    with torch.no_grad():
        lm.forward(batch, bottleneck=True)
    handle.remove()
    masks = layer_masks(calls[0]["attention_mask"], lm.model)
    assert len(masks) == len(set(getattr(lm.model.config.get_text_config(), "layer_types", None) or ["full_attention"]))
    for kind, (mask, window) in masks.items():
        assert mask.shape == (2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1]) and mask.dtype == lm.dtype
        assert set(mask.unique().tolist()) <= {0.0, torch.finfo(lm.dtype).min}  # additive, never boolean
        for b, item in enumerate(items):
            groups = expected_groups(item["input_ids"].tolist(), tok, backbone, k)
            # the group ids livr records (what `livr inspect` and the block_prompt ablation read) name the same groups
            assert [GROUP_NAMES[g] for g in item["groups"].tolist()] == [NAME_OF[g] for g in groups]
            groups += [PAD] * (batch["input_ids"].shape[1] - len(groups))
            real = torch.tensor([g != PAD for g in groups])
            got = mask[b, 0] == 0
            want = expected_allowed(groups, facts.get("bidirectional_images", False), window)
            assert torch.equal(got[real], want[real]), f"example {b}, {kind}: the Stage-1 mask differs from LIVR_SPEC §2"
            # pad rows: never fully masked (no NaN), and no row sees another pad column
            assert got[~real].any(-1).all()
            assert not (got & ~torch.eye(len(groups), dtype=torch.bool))[:, ~real].any()
    # the multi-image example really has several separate images, all of them blocked for the answer
    g0 = expected_groups(items[0]["input_ids"].tolist(), tok, backbone, k)
    runs = sum(1 for i in range(len(g0)) if g0[i] == IMAGE and (i == 0 or g0[i - 1] != IMAGE))
    assert runs == 3


@pytest.mark.parametrize("k", [1, 4])
def test_latent_rows_are_distinct_and_each_trains(k, backbone_cache, data_cache, tmp_path):
    """Each latent has its own embedding row (LIVR_SPEC §1: unshared rows): distinct ids, distinct rows, and
    each row gets its own gradient."""
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, "tiny-qwen2.5-vl", **{"latents.num_latents": k}))
    tok = lm.tokenizer
    names = [f"<livr_latent_{i}>" for i in range(k)] + ["<livr_latent_end>"]
    ids = tok.convert_tokens_to_ids(names)
    assert len(set(ids)) == k + 1 and lm.latent_ids == ids
    assert all(tok.convert_ids_to_tokens(i) == n for i, n in zip(ids, names))
    emb = lm.model.get_input_embeddings()
    rows = emb(torch.tensor(ids))
    assert len({tuple(r.tolist()) for r in rows}) == k + 1, "latent rows must differ"
    item = lm.builder.encode(_rows("Counting", 1, seed=2)[0])
    assert [t for t in item["input_ids"].tolist() if t in ids] == ids  # each latent once, in order
    trainable = sum(p.numel() for n, p in lm.model.named_parameters() if p.requires_grad and "trainable_tokens" in n)
    assert trainable == (k + 1) * rows.shape[1]
    batch = collate([item], tok.pad_token_id)
    answer_loss(lm.forward(batch, True), batch["labels"]).backward()
    (grad,) = [p.grad for n, p in lm.model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    grad = grad.reshape(k + 1, -1)
    assert (grad[:k].abs().sum(-1) > 0).all(), "every latent row receives a gradient"
    assert len({tuple(g.tolist()) for g in grad[:k]}) == k


# ----------------------------------------------------------------------------- the loss, by hand
def test_answer_loss_is_the_shifted_token_mean_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    labels = torch.full((2, 6), -100)
    labels[0, 3], labels[0, 4], labels[0, 5] = 1, 4, 2  # three labelled tokens
    labels[1, 5] = 3  # one
    terms = {0: [], 1: []}
    for b in range(2):
        for t in range(1, 6):
            if labels[b, t] != -100:  # the token at t is predicted by the logits at t - 1
                row = logits[b, t - 1]
                logz = math.log(sum(math.exp(x) for x in row.tolist()))
                terms[b].append(logz - row[labels[b, t]].item())
    token_mean = sum(terms[0] + terms[1]) / 4
    assert answer_loss(logits, labels).item() == pytest.approx(token_mean, abs=1e-6)
    per_example = answer_loss(logits, labels, per_example=True)
    assert per_example.tolist() == pytest.approx([sum(terms[0]) / 3, terms[1][0]], abs=1e-6)


@pytest.mark.parametrize("bottleneck", [True, False])
def test_labelled_positions_loss_equals_the_full_logits_loss(bottleneck, backbone_cache, data_cache, tmp_path):
    """The LM head applied only where a labelled token is predicted gives the full-logits loss and gradients."""
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, "tiny-qwen2.5-vl", **{"lora.dropout": 0.0}))
    rows = _rows(MULTI_IMAGE, 1, seed=4) + generate_task("Counting", 2, seed=4, mode="open", max_count=12)
    batch = collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id)  # right-padded, unequal
    full = answer_loss(lm.forward(batch, bottleneck), batch["labels"], per_example=True)
    count = (batch["labels"] != -100).sum(1)
    full_sum = (full * count).sum()
    full_sum.backward()
    g_full = {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}
    lm.model.zero_grad()
    # the boolean-mask head (transformers flattens the kept rows; indexing a device tensor by a mask syncs the host)
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != -100
    logits = lm.model(**lm.model_inputs(batch, bottleneck), logits_to_keep=keep, use_cache=False).logits
    masked = torch.nn.functional.cross_entropy(logits.float(), batch["labels"][:, 1:][keep[:, :-1]], reduction="sum")
    masked.backward()
    g_masked = {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}
    lm.model.zero_grad()
    seen = []  # what answer_nll hands the model: a [B, n] integer index computed on the host, never a mask
    hook = lm.model.get_base_model().register_forward_pre_hook(
        lambda m, a, k: seen.append(k["logits_to_keep"]), with_kwargs=True)
    nll, n = lm.answer_nll(batch, bottleneck)
    hook.remove()
    assert seen[0].dtype == torch.int64 and seen[0].shape == (len(rows), int(count.max()))
    assert n == int(count.sum())
    assert nll.item() / n == pytest.approx(full_sum.item() / n, rel=1e-6)  # fp32: summation order differs
    assert torch.equal(nll, masked), (nll.item(), masked.item())  # the same sum, bit for bit, as the mask path
    nll.backward()
    for k, g in g_full.items():
        p = dict(lm.model.named_parameters())[k]
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-5), (k, (p.grad - g).abs().max().item())  # fp32 sums
        assert torch.equal(p.grad, g_masked[k]), k


# ----------------------------------------------------------------------------- leak properties, multi-image
def _swapped(lm, task, seed=3):
    """Two encodings of the same text whose images (every one of them) differ."""
    rows = _rows(task, 2, seed)
    a, b = dict(rows[0]), dict(rows[0])
    for c in ("image_1", "image_2", "image_3", "image_4"):
        if a.get(c) is not None:
            b[c] = rows[1][c].resize(a[c].size)
    pad = lm.tokenizer.pad_token_id
    return collate([lm.builder.encode(a)], pad), collate([lm.builder.encode(b)], pad)


@pytest.mark.parametrize("backbone", FAMILIES)
def test_multi_image_no_leak_without_latents(backbone, backbone_cache, data_cache, tmp_path):
    """(b) on three-image examples, and for each image alone: with K = 0 the answer logits and the prompt's
    hidden states are bit-identical whichever pixels any of the images carry."""
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, backbone, **{"latents.num_latents": 0}))
    lm.model.eval()
    rows = _rows(MULTI_IMAGE, 2, seed=3)
    pad = lm.tokenizer.pad_token_id
    base = collate([lm.builder.encode(rows[0])], pad)
    labelled = (base["labels"][0, 1:] != -100).nonzero().flatten()
    ids = base["input_ids"][0].tolist()
    image = lm.tokenizer.convert_tokens_to_ids(spec(backbone)["image"])
    first_image = ids.index(image)
    blind = torch.tensor([i for i, t in enumerate(ids) if i > first_image and t != image])  # prompt + answer
    with torch.no_grad():
        ref = lm.model(**lm.model_inputs(base, True), output_hidden_states=True)
        for c in ("image_1", "image_2", "image_3"):
            other = dict(rows[0], **{c: rows[1][c].resize(rows[0][c].size)})
            batch = collate([lm.builder.encode(other)], pad)
            assert not torch.equal(batch["pixel_values"], base["pixel_values"])
            out = lm.model(**lm.model_inputs(batch, True), output_hidden_states=True)
            assert torch.equal(out.logits[0, labelled], ref.logits[0, labelled]), f"answer sees {c}"
            for h_out, h_ref in zip(out.hidden_states, ref.hidden_states):
                assert torch.equal(h_out[0, blind], h_ref[0, blind]), f"prompt sees {c}"
            plain = lm.forward(batch, bottleneck=False)[0, labelled]
            assert not torch.equal(plain, lm.forward(base, bottleneck=False)[0, labelled]), "Stage 2 sees the image"


@pytest.mark.parametrize("backbone", FAMILIES)
def test_multi_image_gradient_reaches_pixels_only_through_latents(backbone, backbone_cache, data_cache, tmp_path):
    """(c) and (d) on three-image examples: the answer changes with the images via the latents; the
    answer-loss gradient reaches every image's pixels, and none of them once the latents are image-blind."""
    lm = build_model(_cfg(backbone_cache, data_cache, tmp_path, backbone, **{"latents.num_latents": 2}))
    lm.model.eval()
    a, b = _swapped(lm, MULTI_IMAGE)
    labelled = (a["labels"][0, 1:] != -100).nonzero().flatten()
    with torch.no_grad():
        assert (lm.forward(a, True)[0, labelled] - lm.forward(b, True)[0, labelled]).abs().max() > 1e-6
    calls, handle = capture_inputs(lm)
    with torch.no_grad():
        lm.forward(a, True)
    handle.remove()
    mask = calls[0]["attention_mask"]
    ids = a["input_ids"][0].tolist()
    groups = expected_groups(ids, lm.tokenizer, backbone, 2)
    latent_rows = torch.tensor([i for i, g in enumerate(groups) if g == LATENT])
    image_cols = torch.tensor([i for i, g in enumerate(groups) if g == IMAGE])

    def blind(m):  # the latents' rows lose the image columns too
        out = m.clone()
        out[0, 0, latent_rows[:, None], image_cols[None]] = torch.finfo(lm.dtype).min
        if hasattr(m, "livr_groups"):  # a linear-attention layer's (livr/backbones/gated_deltanet.py): no matrix to
            from livr.backbones.gated_deltanet import tag  # mask, so its latents read the image-blind recurrence

            tag(out, torch.where(m.livr_groups == GROUP_LATENT, GROUP_PROMPT, m.livr_groups), m.livr_bottleneck)
        return out

    blinded = {k: blind(m) for k, m in mask.items()} if isinstance(mask, dict) else blind(mask)

    def pixel_grad(m):
        px = a["pixel_values"].clone().requires_grad_(True)
        inputs = lm.model_inputs({**a, "pixel_values": px}, True)
        inputs["attention_mask"] = m
        loss = answer_loss(lm.model(**inputs).logits, a["labels"])
        (g,) = torch.autograd.grad(loss, px, allow_unused=True)
        return torch.zeros_like(px) if g is None else g

    g = pixel_grad(mask).abs()
    if "image_grid_thw" in a:  # Qwen: the rows of pixel_values are the images' patches, image after image
        per_image = torch.stack([c.sum() for c in g.split(a["image_grid_thw"].prod(-1).tolist())])
    else:  # LLaVA-OneVision, Gemma 3: one entry per image
        per_image = g.flatten(1).sum(1)
    assert per_image.shape == (3,) and (per_image > 0).all(), "every image reaches the answer through the latents"
    assert pixel_grad(blinded).abs().sum() == 0


def test_verify_passes_on_a_multi_image_task_and_catches_a_later_image_leak(backbone_cache, data_cache, tmp_path):
    """`livr verify` on three-image rows; a mask that blocks only the first image fails it."""
    from livr.insight.verify import verify
    from livr.method.mask import bottleneck_mask

    cfg = _cfg(backbone_cache, data_cache, tmp_path, "tiny-qwen2.5-vl", **{"data.tasks": MULTI_IMAGE})
    checks = verify(cfg)
    assert all(c.passed for c in checks), "\n".join(c.line() for c in checks)

    def first_image_only(groups, dtype):  # the bug class: later images' tokens left visible
        mask = bottleneck_mask(groups, dtype).clone()
        n = groups.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for i in range(groups.shape[0]):
            img = (groups[i] == GROUP_IMAGE).nonzero().flatten()
            second = int(img[1:][img[1:] - img[:-1] > 1][0])  # the second image's first token
            later = torch.zeros(n, dtype=torch.bool)
            later[img[img >= second]] = True
            mask[i, 0][causal & later[None, :] & (groups[i] != GROUP_PAD)[:, None]] = 0
        return mask

    leaky = {c.name[:3]: c for c in verify(cfg, mask_fn=first_image_only)}
    assert not leaky["(a)"].passed and not leaky["(c)"].passed


def test_a_lora_pattern_reaching_the_vision_tower_is_refused(backbone_cache, data_cache, tmp_path, monkeypatch):
    """The vision encoder and projector stay frozen: a LoRA pattern that would adapt them is an error."""
    import livr.model.build

    monkeypatch.setattr(livr.model.build, "lora_regex", lambda family_regex, targets: r".*\.(qkv|q_proj|k_proj|v_proj|o_proj)")
    with pytest.raises(RuntimeError, match="vision/projector parameters would train"):
        build_model(_cfg(backbone_cache, data_cache, tmp_path, "tiny-qwen2.5-vl"))
