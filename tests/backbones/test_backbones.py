"""livr.backbones: tiny presets round-trip, processor/model agreement, 4-D masks + explicit positions, KV-cache
decoding with next_position_ids, LoRA/frozen regexes, family lookup and preset caching. CPU, offline, fast."""
import os

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")

import json
import re
import time

import pytest
import torch
from PIL import Image

from livr.backbones import FAMILIES, TINY_PRESETS, Backbone, family_for, load_backbone, make_tiny, resolve_backbone_path
from livr.backbones.registry import build_tiny

FAMILY_OF = {f.tiny_preset: f.name for f in FAMILIES.values()}  # every registered family, by its tiny preset


@pytest.fixture(scope="session")
def preset_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {name: make_tiny(name, str(root / name)) for name in TINY_PRESETS}


_LOADED = {}


@pytest.fixture
def bb(request, preset_dirs) -> Backbone:
    key = (request.param, "sdpa")
    if key not in _LOADED:
        _LOADED[key] = load_backbone(preset_dirs[request.param])
    return _LOADED[key]


presets = pytest.mark.parametrize("bb", TINY_PRESETS, indirect=True)


def _img(size, seed):
    g = torch.Generator().manual_seed(seed)
    w, h = size
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _prompt(bb, n_images, text):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return bb.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=False)


def _batch(bb, texts, images, padding_side="right"):
    return bb.processor(text=texts, images=images, padding_side=padding_side, return_tensors="pt")


def _fwd_kwargs(bb, b):
    return {k: b[k] for k in bb.family.forward_keys if k in b}


def _groups(bb, ids, mask):
    from livr.method.groups import IMAGE, PAD, PROMPT

    g = torch.full_like(ids, PROMPT)
    g[ids == bb.tokenizer.convert_tokens_to_ids(bb.family.image_token)] = IMAGE
    return g.masked_fill(mask == 0, PAD)


def _mask4d(bb, ids, mask, dtype, n_query=None):
    """Additive [B,1,Q,K] mask(s) of the model's own rules (the family's `own_allowed`: causal for a causal LM, a
    dict per layer type for Gemma 3) from a 2-D padding mask; with n_query the last n_query rows (a decode step).
    The tests compare a forward under it with the model's own 2-D path."""
    return bb.family.as_mask(bb.model, bb.family.own_allowed(bb.model, _groups(bb, ids, mask)), dtype, n_query)


def _lm_loss(bb, b, **extra):
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return bb.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels,
                    **_fwd_kwargs(bb, b), **extra).loss


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_roundtrip_identical_logits(name, preset_dirs, tmp_path):
    mem, tok, _ = build_tiny(name, seed=0)
    loaded = load_backbone(preset_dirs[name])
    assert loaded.family is FAMILIES[FAMILY_OF[name]] and loaded.path == preset_dirs[name]
    assert loaded.tokenizer.get_vocab() == tok.get_vocab() and loaded.tokenizer.chat_template == tok.chat_template
    b = _batch(loaded, [_prompt(loaded, 1, "Which half is brighter?")], [[_img((112, 112), 0)]])
    with torch.no_grad():
        ref = mem.eval()(**b).logits
        assert torch.equal(ref, loaded.model(**b).logits)
    # the processor wrapper saves (tokenizer + image processor); model + processor reload identically
    loaded.model.save_pretrained(tmp_path)
    loaded.processor.save_pretrained(tmp_path)
    again = load_backbone(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(ref, again.model(**again.processor(text=[_prompt(again, 1, "Which half is brighter?")],
                                                             images=[[_img((112, 112), 0)]],
                                                             return_tensors="pt")).logits)


@presets
def test_forward_backward_one_image(bb):
    b = _batch(bb, [_prompt(bb, 1, "Which half is brighter? (A) left (B) right")], [[_img((112, 112), 1)]])
    bb.model.train()
    times = []
    for _ in range(4):
        bb.model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = _lm_loss(bb, b)
        loss.backward()
        times.append(time.perf_counter() - t)
    bb.model.eval()
    assert torch.isfinite(loss)
    lm = [p for n, p in bb.model.named_parameters()
          if n.endswith(".weight") and re.fullmatch(bb.family.lora_target_regex, n.rsplit(".", 1)[0])]
    assert lm and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm)
    n_params = sum(p.numel() for p in bb.model.parameters())
    print(f"\n{bb.family.name}: {n_params:,} params, seq {b['input_ids'].shape[1]}, "
          f"fwd+bwd {1e3 * sorted(times)[len(times) // 2]:.1f} ms")


def _image_feature_lengths(bb, b):
    import inspect

    inner = bb.model.model
    takes = inspect.signature(inner.get_image_features).parameters
    with torch.no_grad():
        out = inner.get_image_features(**{k: b[k] for k in bb.family.forward_keys if k in takes})
    return [f.shape[0] for f in out.pooler_output]


@presets
@pytest.mark.parametrize("n_images", [1, 2])
def test_image_tokens_match_model_features(bb, n_images):
    sizes = [(112, 112), (96, 64), (56, 56), (200, 150)]
    texts = [_prompt(bb, n_images, "Same?"), _prompt(bb, n_images, "Are these two the same picture or not?")]
    images = [[_img(sizes[(2 * i + j) % 4], 10 * i + j) for j in range(n_images)] for i in range(2)]
    b = _batch(bb, texts, images)
    feats = _image_feature_lengths(bb, b)
    n_tok = (b["input_ids"] == bb.tokenizer.convert_tokens_to_ids(bb.family.image_token)).sum(1).tolist()
    assert n_tok == [sum(feats[i * n_images:(i + 1) * n_images]) for i in range(2)]
    print(f"\n{bb.family.name}: {n_images} image(s)/example, image sizes {[im.size for ex in images for im in ex]}"
          f" -> image tokens {feats}")
    bb.model.zero_grad(set_to_none=True)
    loss = _lm_loss(bb, b)  # the model consumes exactly these tokens (it raises on a mismatch)
    loss.backward()
    assert torch.isfinite(loss)
    bb.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", TINY_PRESETS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_4d_mask_and_position_ids_match_2d(name, attn, preset_dirs):
    bb = _LOADED.get((name, attn)) or _LOADED.setdefault((name, attn),
                                                          load_backbone(preset_dirs[name], attn_implementation=attn))
    texts = [_prompt(bb, 1, "Which half of the image is brighter, left or right? Answer (A) or (B)."),
             _prompt(bb, 1, "Count.")]
    b = _batch(bb, texts, [[_img((112, 112), 3)], [_img((56, 56), 4)]], padding_side="right")
    ids, mask = b["input_ids"], b["attention_mask"]
    assert mask[1].sum() < mask[0].sum() and mask[1, -1] == 0  # right-padded, different lengths
    pos = bb.family.position_ids(bb.model, ids, mask, dict(b))
    expect = (3, 2, ids.shape[1]) if bb.family.mrope else (2, ids.shape[1])
    assert tuple(pos.shape) == expect and pos.dtype == torch.long
    with torch.no_grad():
        ref = bb.model(**b).logits
        out = bb.model(input_ids=ids, attention_mask=_mask4d(bb, ids, mask, torch.float32), position_ids=pos,
                       **_fwd_kwargs(bb, b)).logits
    assert torch.isfinite(out).all()
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=0)


@presets
@pytest.mark.parametrize("mask_kind", ["2d", "4d"])
def test_kv_cache_decode_with_next_position_ids(bb, mask_kind):
    fam, model = bb.family, bb.model
    texts = [_prompt(bb, 1, "Which half of the image is brighter, left or right?"), _prompt(bb, 1, "Count.")]
    b = _batch(bb, texts, [[_img((112, 112), 5)], [_img((56, 56), 6)]], padding_side="left")
    ids, mask = b["input_ids"], b["attention_mask"]
    assert mask[1, 0] == 0  # left-padded
    new = torch.tensor([[bb.tokenizer.convert_tokens_to_ids("A")]] * 2)
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    mm = {k: v for k, v in b.items() if k not in ("input_ids", "attention_mask")}
    mm_full = dict(mm, **{k: torch.cat([b[k], torch.zeros_like(new)], 1)
                          for k in ("mm_token_type_ids", "token_type_ids") if k in b})
    pos_prefix = fam.position_ids(model, ids, mask, mm)
    pos_full = fam.position_ids(model, full_ids, full_mask, mm_full)
    nxt = fam.next_position_ids(pos_prefix, 1)
    assert torch.equal(nxt, pos_full[..., -1:])
    assert torch.equal(fam.next_position_ids(pos_prefix, 3)[..., 1:2], nxt + 1)
    fwd = {k: v for k, v in _fwd_kwargs(bb, b).items() if k != "mm_token_type_ids"}
    fwd_full = {k: mm_full.get(k, v) for k, v in fwd.items()}  # token_type_ids (Gemma 3) cover the new token
    with torch.no_grad():
        full = model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos_full, **fwd_full).logits[:, -1]
        if fam.mrope:  # the model's own 2-D path (mRoPE from get_rope_index) gives the same logits
            own = model(input_ids=full_ids, attention_mask=full_mask, **dict(fwd_full, mm_token_type_ids=mm_full["mm_token_type_ids"])).logits[:, -1]
            torch.testing.assert_close(own, full, atol=1e-5, rtol=0)
        pre_mask = mask if mask_kind == "2d" else _mask4d(bb, ids, mask, torch.float32)
        pre = model(input_ids=ids, attention_mask=pre_mask, position_ids=pos_prefix, use_cache=True, **fwd)
        step_mask = full_mask if mask_kind == "2d" else _mask4d(bb, full_ids, full_mask, torch.float32, n_query=1)
        step = model(input_ids=new, attention_mask=step_mask, position_ids=nxt, cache=pre.cache, use_cache=True)
    # a linear-attention layer decodes with the per-token recurrent kernel, the full forward with the chunked one:
    # the same recurrence summed in another order (stock transformers: the 2-D path differs by ~1e-5 too)
    atol = 5e-5 if hasattr(fam, "gdn_class") else 1e-5
    torch.testing.assert_close(step.logits[:, -1], full, atol=atol, rtol=0)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_lora_and_frozen_regexes(name):
    from peft import LoraConfig, get_peft_model

    fam = FAMILIES[FAMILY_OF[name]]
    model, tok, _ = build_tiny(name)
    vision_prefixes = ("model.visual", "model.vision_tower", "model.multi_modal_projector", "model.image_newline")
    lora = [n for n, _ in model.named_modules() if re.fullmatch(fam.lora_target_regex, n)]
    # every linear projection of the LM's layers (attention q/k/v/o, a hybrid's linear-attention projections, the
    # MLP or a MoE's shared-expert MLP), never a MoE router (`mlp.gate`, `shared_expert_gate`); a MoE without a shared
    # expert (Qwen3-VL-MoE) has only its attention projections as Linear layers (its experts are 3-D parameters)
    proj = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n.startswith("model.language_model.layers.") and not re.search(r"\.(gate|shared_expert_gate)$", n)]
    assert sorted(lora) == sorted(proj) and len(lora) >= 4 * model.config.get_text_config().num_hidden_layers
    assert all(n.startswith("model.language_model.layers.") for n in lora)
    assert not any(re.fullmatch(fam.frozen_module_regex, n) for n in lora)
    for n, _ in model.named_parameters():
        assert bool(re.fullmatch(fam.frozen_module_regex, n)) == n.startswith(vision_prefixes), n
    assert any(re.fullmatch(fam.frozen_module_regex, n) for n, _ in model.named_modules() if "merger" in n
               or "projector" in n)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=fam.lora_target_regex))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(lora) and all(".language_model.layers." in n for n in trainable)
    # position_ids sees through the PeftModel wrapper
    content = [{"type": "image"}, {"type": "text", "text": "hi"}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    ids = tok([text], return_tensors="pt")["input_ids"]
    image_id = tok.convert_tokens_to_ids(fam.image_token)
    if fam.mrope:  # expand the single placeholder to a 2x2 merged grid (4 tokens) by hand
        k = ids[0].tolist().index(image_id)
        ids = torch.cat([ids[:, :k], torch.full((1, 4), image_id), ids[:, k + 1:]], 1)
    mm = {"image_grid_thw": torch.tensor([[1, 4, 4]])}
    mask = torch.ones_like(ids)
    assert torch.equal(fam.position_ids(peft_model, ids, mask, mm), fam.position_ids(model, ids, mask, mm))


def test_family_for(preset_dirs, tmp_path):
    for name, d in preset_dirs.items():
        assert family_for(d).name == FAMILY_OF[name]
    assert family_for("qwen2_5_vl").model_class.__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert family_for("qwen3_vl").name == "qwen3_vl" and family_for("llava_onevision").image_token == "<image>"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert"):
        family_for(str(tmp_path))
    with pytest.raises(ValueError, match="gpt2"):
        family_for("gpt2")


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_resolve_backbone_path_caches(name, tmp_path):
    path = resolve_backbone_path(name, str(tmp_path))
    assert path == str(tmp_path / name) and family_for(path).name == FAMILY_OF[name]
    cfg = os.path.join(path, "config.json")
    mtime = os.stat(cfg).st_mtime_ns
    time.sleep(0.01)
    assert resolve_backbone_path(name, str(tmp_path)) == path
    assert os.stat(cfg).st_mtime_ns == mtime
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no leftover temp dirs
    assert resolve_backbone_path(path, "/nonexistent") == path  # an existing local dir is itself
    assert resolve_backbone_path("Qwen/Qwen2.5-VL-3B-Instruct", str(tmp_path)) == "Qwen/Qwen2.5-VL-3B-Instruct"
    (tmp_path / "empty").mkdir()  # make_tiny replaces an existing dir that is not this preset
    assert family_for(make_tiny(name, str(tmp_path / "empty"), seed=1)).name == FAMILY_OF[name]
    if name == TINY_PRESETS[0]:  # load by preset name through the cache
        assert load_backbone(name, cache_dir=str(tmp_path)).path == path


def test_every_family_is_registered_once_with_a_tiny_preset():
    """The tests iterate TINY_PRESETS: every registered family must have one (and each preset one family)."""
    assert set(FAMILY_OF.values()) == set(FAMILIES) and set(FAMILY_OF) == set(TINY_PRESETS)
    types = [t for f in FAMILIES.values() for t in f.model_types]
    assert len(types) == len(set(types))


def test_unknown_and_refused_model_types_are_one_line_errors(tmp_path):
    for model_type, words in (("bert", ["unsupported model_type 'bert'", "docs/backbones.md"]),
                              ("qwen3_next", ["not supported", "text-only", "Qwen3.5"])):
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(ValueError) as e:
            family_for(str(d))
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)


def test_a_family_is_one_registered_class():
    """Adding a family is one class with @register: family_for finds it; an incomplete or clashing one is refused."""
    from livr.backbones.base import Family
    from livr.backbones.registry import register

    base = FAMILIES["qwen2_5_vl"]
    try:
        @register
        class Renamed(type(base)):
            name = "test_family"
            model_types = ("test_vlm",)

        assert family_for("test_vlm") is FAMILIES["test_family"] and family_for("test_vlm").mrope
        with pytest.raises(TypeError, match="does not define 'model_class'"):
            @register
            class Incomplete(Family):
                name, model_types = "incomplete", ("incomplete_vlm",)
        with pytest.raises(TypeError, match="model_type 'test_vlm' is already family test_family"):
            @register
            class Clash(type(base)):
                name, model_types = "clash", ("test_vlm",)
        with pytest.raises(TypeError, match="rope="):
            @register
            class BadRope(type(base)):
                name, model_types, rope = "bad_rope", ("bad_rope_vlm",), "alibi"
    finally:
        for k in ("test_family", "incomplete", "clash", "bad_rope"):
            FAMILIES.pop(k, None)


def test_gemma3_stage1_mask_is_the_models_own_mask_and_the_bottleneck(preset_dirs):
    """Gemma 3 attends both ways within each image and in a sliding window on its local layers: the Stage-1 mask is
    what transformers itself builds for the model (from token_type_ids) AND NOT (prompt/answer row x image column),
    for each layer type; image tokens still see each other both ways; nothing else is opened or closed."""
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    from livr.method.groups import ANSWER, IMAGE, LATENT, PAD, PROMPT

    bb = load_backbone(preset_dirs["tiny-gemma3"], attn_implementation="eager")
    texts = [_prompt(bb, 2, "Which image is brighter? Answer (A) or (B)."), _prompt(bb, 1, "Count.")]
    b = _batch(bb, texts, [[_img((112, 112), 1), _img((56, 56), 2)], [_img((56, 56), 3)]], padding_side="right")
    ids, mask = b["input_ids"], b["attention_mask"]
    groups = _groups(bb, ids, mask)
    for row in range(2):  # the last 6 real tokens: 3 latents then 3 answer tokens; text after the images: prompt
        n = int(mask[row].sum())
        groups[row, n - 6 : n - 3], groups[row, n - 3 : n] = LATENT, ANSWER
    text = bb.model.config.get_text_config()
    assert text.sliding_window < ids.shape[1] and set(text.layer_types) == {"full_attention", "sliding_attention"}
    own = create_masks_for_vision_model(config=text, inputs_embeds=torch.zeros(*ids.shape, text.hidden_size),
                                        attention_mask=mask, cache=None, position_ids=None,
                                        block_sequence_ids=get_block_sequence_ids_for_mask(b["token_type_ids"]))
    got = bb.family.stage1_mask(bb.model, groups, torch.float32)
    assert set(got) == set(own)
    blind = (groups == PROMPT) | (groups == ANSWER)
    blocked = blind[:, :, None] & (groups == IMAGE)[:, None, :]
    real = (groups != PAD)[:, :, None] & (groups != PAD)[:, None, :]
    for kind, m in own.items():
        theirs = (m == 0) if m.dtype.is_floating_point else m  # eager: additive; else boolean
        mine = got[kind] == 0
        assert torch.equal(mine[:, 0][real], (theirs[:, 0] & ~blocked)[real]), kind
        assert not mine[:, 0][blocked].any()
    img = torch.nonzero(groups[0] == IMAGE).flatten()
    first, last = img[0].item(), img[3].item()  # the first image's first and last soft token (4 per image)
    assert got["full_attention"][0, 0, first, last] == 0 and got["full_attention"][0, 0, last, first] == 0


@presets
def test_a_decode_step_mask_is_the_last_rows_of_the_whole_mask(bb):
    """Bottleneck decoding builds only the new rows (never the whole L x L): for every family, the Stage-1 mask
    of the last r query rows equals those rows of the whole mask (per layer type, sliding-window columns cut as
    the cache holds them), on a padded two-example batch with images, latents and an answer."""
    from livr.method.groups import ANSWER, LATENT, PAD
    from livr.method.mask import bottleneck_blocked

    texts = [_prompt(bb, 2, "compare these"), _prompt(bb, 1, "and this one, a longer question here")]
    b = _batch(bb, texts, [[_img((56, 56), 1), _img((56, 56), 2)], [_img((56, 56), 3)]])
    groups = _groups(bb, b["input_ids"], b["attention_mask"])
    for i in range(2):
        real = (groups[i] != PAD).nonzero().flatten()
        groups[i, real[-3:]] = ANSWER
        groups[i, real[-5:-3]] = LATENT
    fam = bb.family
    own, blocked = fam.own_allowed(bb.model, groups), bottleneck_blocked(groups)
    whole = {k: a & ~blocked for k, a in own.items()} if isinstance(own, dict) else own & ~blocked
    for r in (1, 3, groups.shape[1] - 2):  # the last: query rows over the images too
        step = fam.stage1_mask(bb.model, groups, torch.float32, rows=r)
        want = fam.as_mask(bb.model, whole, torch.float32, r)  # the whole mask built, then its last rows
        if isinstance(want, dict):
            assert step.keys() == want.keys()
            for k in want:
                assert torch.equal(step[k], want[k]), k
        else:
            assert step.shape[-2] == r and torch.equal(step, fam.stage1_mask(bb.model, groups, torch.float32)[:, :, -r:])
            assert torch.equal(step, want)
