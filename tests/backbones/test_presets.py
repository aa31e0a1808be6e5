"""Real-size presets (the published architectures with random weights, cut to model.num_layers) and `livr plan`
from the data. The expected values are written here from the checkpoints' published config.json /
preprocessor_config.json, not read from livr's copies. CPU, offline; the full-width steps take most of the time."""
import gc
import json
import os

import pytest
import torch
from PIL import Image

from livr.backbones import load_backbone, preset_parts, resolve_backbone_path
from livr.backbones.base import make_processor
from livr.backbones.registry import _is_preset, family_for, preset_dirname
from livr.config import ConfigError, load_config

# config.json (+ preprocessor_config.json) of each checkpoint, as published. Qwen3.5: transformers builds no MTP
# (multi-token prediction) layer, which the checkpoints also hold; the published sizes count it (configs/README.md)
QWEN35_4B_PARAMS, QWEN35_35B_PARAMS, QWEN35_35B_ACTIVE = 4_539_265_536, 35_107_181_936, 3_901_560_176
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PUBLISHED = {
    "size-qwen2.5-vl-3b": {  # Qwen/Qwen2.5-VL-3B-Instruct
        "params": 3_754_622_976,
        "text": {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                 "intermediate_size": 11008, "vocab_size": 151936},
        "tied": True, "rope": {"mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                   "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 2048,
                   "fullatt_block_indexes": [7, 15, 23, 31]},
        "processor": {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136,
                      "max_pixels": 12845056, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        "depth2": {"fullatt_block_indexes": [1]},
    },
    "size-qwen3-vl-4b": {  # Qwen/Qwen3-VL-4B-Instruct
        "params": 4_437_815_808,
        "text": {"hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936},
        "tied": True, "rope": {"mrope_section": [24, 20, 20], "mrope_interleaved": True, "rope_theta": 5000000},
        "vision": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16,
                   "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2560,
                   "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]},
        "processor": {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 65536,
                      "max_pixels": 16777216, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "depth2": {"deepstack_visual_indexes": [1]},
    },
    "size-qwen3-vl-30b-a3b": {  # Qwen/Qwen3-VL-30B-A3B-Instruct (MoE: 128 experts of width 768, 8 per token)
        "params": 31_070_754_032,
        "text": {"hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                 "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936, "num_experts": 128,
                 "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1},
        "tied": False, "rope": {"mrope_section": [24, 20, 20], "mrope_interleaved": True, "rope_theta": 5000000},
        "vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
                   "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2048,
                   "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
        "processor": {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 65536,
                      "max_pixels": 16777216, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "depth2": {"deepstack_visual_indexes": [1]},
    },
    "size-qwen3.5-4b": {  # Qwen/Qwen3.5-4B (hybrid: 3 Gated DeltaNet layers : 1 full-attention layer, 32 layers)
        "params": QWEN35_4B_PARAMS,
        "text": {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": 4,
                 "head_dim": 256, "intermediate_size": 9216, "vocab_size": 248320, "linear_num_key_heads": 16,
                 "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                 "linear_conv_kernel_dim": 4},
        "tied": True, "rope": {"mrope_section": [11, 11, 10], "mrope_interleaved": True, "rope_theta": 10000000,
                               "partial_rotary_factor": 0.25},
        "vision": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16,
                   "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2560,
                   "num_position_embeddings": 2304, "deepstack_visual_indexes": []},
        "processor": {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 65536,
                      "max_pixels": 16777216, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "depth2": {},
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    },
    "size-qwen3.5-35b-a3b": {  # Qwen/Qwen3.5-35B-A3B (hybrid as above; 256 experts of width 512, 8 per token, shared)
        "params": QWEN35_35B_PARAMS,
        "text": {"hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16, "num_key_value_heads": 2,
                 "head_dim": 256, "vocab_size": 248320, "num_experts": 256, "num_experts_per_tok": 8,
                 "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "linear_num_key_heads": 16,
                 "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                 "linear_conv_kernel_dim": 4},
        "tied": False, "rope": {"mrope_section": [11, 11, 10], "mrope_interleaved": True, "rope_theta": 10000000,
                                "partial_rotary_factor": 0.25},
        "vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
                   "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2048,
                   "num_position_embeddings": 2304, "deepstack_visual_indexes": []},
        "processor": {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 65536,
                      "max_pixels": 16777216, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "depth2": {},
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    },
    "size-llava-onevision-7b": {  # llava-hf/llava-onevision-qwen2-7b-ov-hf (Qwen2-7B + SigLIP-so400m, 26 layers)
        "params": 8_030_807_584,
        "text": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "intermediate_size": 18944, "vocab_size": 152128},
        "tied": False, "rope": {"rope_theta": 1000000.0},
        "vision": {"num_hidden_layers": 26, "hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                   "image_size": 384, "patch_size": 14},
        "processor": {"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "depth2": {},
    },
    "size-gemma-3-4b": {  # google/gemma-3-4b-it (Gemma 3 4B + SigLIP-so400m at 896 px, no head)
        "params": 4_300_079_472,
        "text": {"hidden_size": 2560, "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
                 "head_dim": 256, "intermediate_size": 10240, "vocab_size": 262208, "sliding_window": 1024,
                 "query_pre_attn_scalar": 256},
        "tied": True, "rope": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "vision": {"num_hidden_layers": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                   "image_size": 896, "patch_size": 14},
        "processor": {"size": {"height": 896, "width": 896}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "depth2": {},
        "mm_tokens_per_image": 256,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],  # the first six of 34, repeating
    },
}


def _check_processor(ip, want):
    for k, v in want.items():
        if k == "min_pixels":
            assert ip.size["shortest_edge"] == v
        elif k == "max_pixels":
            assert ip.size["longest_edge"] == v
        elif k == "size":
            assert (ip.size["height"], ip.size["width"]) == (v["height"], v["width"])
        else:
            got = getattr(ip, k)
            assert (list(got) if isinstance(got, (list, tuple)) else got) == v, k


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_size_preset_is_the_published_architecture(name):
    """Widths, heads, vocab, rope, tied head, vision tower and image processor = the checkpoint's; the parameter
    count (meta device) = the published size; num_layers=2 keeps every width and cuts both towers."""
    want = PUBLISHED[name]
    cfg, tok, ip = preset_parts(name)
    text = cfg.get_text_config()
    for k, v in want["text"].items():
        assert getattr(text, k) == v, k
    for k, v in want["rope"].items():
        assert text.rope_parameters[k] == v, k
    for k, v in want["vision"].items():
        assert getattr(cfg.vision_config, k) == v, k
    _check_processor(ip, want["processor"])
    if name.startswith("size-llava"):
        assert cfg.vision_aspect_ratio == "anyres_max_9" and len(ip.image_grid_pinpoints) == 36
        assert ip.image_grid_pinpoints[-1] == [2304, 2304] and cfg.vision_feature_select_strategy == "full"
    if "layer_types" in want:  # the published pattern, repeating (Gemma 3's 34 layers end mid-period)
        period = want["layer_types"]
        assert text.layer_types == (period * text.num_hidden_layers)[:text.num_hidden_layers]
    if "mm_tokens_per_image" in want:
        assert cfg.mm_tokens_per_image == want["mm_tokens_per_image"]
    fam = family_for(cfg.model_type)
    assert len(tok) < text.vocab_size  # the offline BPE; the embedding keeps the real vocab (unused rows)
    assert tok.convert_tokens_to_ids(fam.image_token) == cfg.image_token_id
    with torch.device("meta"):
        model = fam.model_class._from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == want["params"]
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == want["tied"]
    del model

    cut, _, _ = preset_parts(name, 2)
    t2 = cut.get_text_config()
    assert t2.num_hidden_layers == 2 and len(getattr(t2, "layer_types", None) or [0, 0]) == 2
    v2 = cut.vision_config
    assert (getattr(v2, "depth", None) or v2.num_hidden_layers) == 2
    for k, v in want["depth2"].items():
        assert getattr(v2, k) == v, k
    for k, v in want["text"].items():
        if k != "num_hidden_layers":
            assert getattr(t2, k) == v, k
    with pytest.raises(ConfigError, match="model.num_layers=99"):
        preset_parts(name, 99)


def _image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def q25_depth2(tmp_path_factory):
    """size-qwen2.5-vl-3b at depth 2, materialised through the cache path (as model.backbone + num_layers)."""
    cache = tmp_path_factory.mktemp("size-presets")
    return resolve_backbone_path("size-qwen2.5-vl-3b", str(cache), num_layers=2)


@pytest.mark.slow
def test_size_preset_depth2_materialises_loads_and_steps(q25_depth2):
    """Offline materialisation at depth 2 (true width), stamped; through build_model (K=4 latents in the padded
    vocab rows, LoRA); one Stage-1 forward + backward on a 448x448 image (256 image tokens) in fp32, and a forward
    on a 224x224 image in bf16."""
    from livr.data.sequence import collate
    from livr.model.build import build_model

    d = q25_depth2
    assert os.path.basename(d) == "size-qwen2.5-vl-3b-L2"
    with open(os.path.join(d, "livr_preset.json")) as f:
        assert json.load(f) == {"preset": "size-qwen2.5-vl-3b", "seed": 0, "num_layers": 2, "dtype": "bfloat16",
                                "format": 1}
    with open(os.path.join(d, "config.json")) as f:
        saved = json.load(f)
    assert saved["text_config"]["hidden_size"] == 2048 and saved["text_config"]["vocab_size"] == 151936
    assert saved["vision_config"]["depth"] == 2 and saved["text_config"]["num_hidden_layers"] == 2
    for dtype, side in (("float32", 448), ("bfloat16", 224)):
        row = {"idx": "t0", "sub_task": "Counting", "question": "How many squares are there?",
               "choices": ["1", "2", "3", "4"], "answer": "(B)", "image_1": _image(side, side)}
        cfg = load_config(None, [f"model.backbone={d}", "model.device=cpu", f"model.dtype={dtype}",
                                 "latents.num_latents=4", "lora.r=4"])
        lm = build_model(cfg)
        emb = lm.model.get_input_embeddings()
        assert lm.base_vocab == 151936 and max(lm.latent_ids) < 151936  # latents reuse padded rows: no resize
        assert getattr(emb, "base_layer", emb).weight.shape == (151936, 2048)
        assert lm.backbone.processor.image_processor.size["longest_edge"] == 12845056
        batch = collate([lm.builder.encode(row)], lm.tokenizer.pad_token_id)
        assert int((batch["groups"] == 1).sum()) == (side // 28) ** 2  # 448 px: 256 tokens (patch 14, merge 2)
        lm.model.train()
        nll, n = lm.answer_nll(batch, bottleneck=True)
        assert torch.isfinite(nll) and n == 2
        assert getattr(emb, "base_layer", emb).weight.dtype == getattr(torch, dtype)
        if dtype == "float32":  # bf16 matmul backward on a CPU without AVX512-BF16 takes minutes: tiny preset below
            _check_step(lm, nll, n)
        del lm, batch, nll
        gc.collect()


def _check_step(lm, nll, n):
    (nll / n).backward()
    grads = {k: p.grad for k, p in lm.model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any("trainable_tokens" in k and g.abs().sum() > 0 for k, g in grads.items())


def test_bf16_step_on_a_tiny_preset(backbone_cache):
    """A bfloat16 Stage-1 forward + backward (the dtype GPUs train in): finite, latents get a gradient. At true
    width this costs ~2 min on an AVX2-only CPU (bf16 GEMM backward falls back to a slow kernel), so it runs on the
    tiny preset; the true-width bf16 forward is in the test above."""
    from livr.data.sequence import collate
    from livr.model.build import build_model

    row = {"idx": "t0", "sub_task": "Counting", "question": "How many squares are there?",
           "choices": ["1", "2", "3", "4"], "answer": "(B)", "image_1": _image(112, 112)}
    cfg = load_config(None, ["model.backbone=tiny-qwen2.5-vl", f"model.cache_dir={backbone_cache}", "model.device=cpu",
                             "model.dtype=bfloat16", "latents.num_latents=4", "lora.r=4"])
    lm = build_model(cfg)
    emb = lm.model.get_input_embeddings()
    assert getattr(emb, "base_layer", emb).weight.dtype == torch.bfloat16
    batch = collate([lm.builder.encode(row)], lm.tokenizer.pad_token_id)
    lm.model.train()
    nll, n = lm.answer_nll(batch, bottleneck=True)
    assert torch.isfinite(nll) and n == 2
    _check_step(lm, nll, n)


def test_preset_dirs_and_stamps_distinguish_depths(q25_depth2, tmp_path):
    name = "size-qwen2.5-vl-3b"
    assert preset_dirname(name, 2) == f"{name}-L2" and preset_dirname(name, 0) == preset_dirname(name, 36) == \
        f"{name}-L36"
    assert _is_preset(q25_depth2, name, 0, 2) and not _is_preset(q25_depth2, name, 0, 0)
    assert not _is_preset(q25_depth2, name, 0, 1)
    # tiny presets keep their directory and stamp at their own depth; another depth is its own directory
    full = resolve_backbone_path("tiny-qwen3-vl", str(tmp_path))
    one = resolve_backbone_path("tiny-qwen3-vl", str(tmp_path), num_layers=1)
    assert os.path.basename(full) == "tiny-qwen3-vl" and os.path.basename(one) == "tiny-qwen3-vl-L1"
    with open(os.path.join(full, "livr_preset.json")) as f:
        assert json.load(f) == {"preset": "tiny-qwen3-vl", "seed": 0, "format": 1}
    bb = load_backbone("tiny-qwen3-vl", cache_dir=str(tmp_path), num_layers=1)
    assert bb.path == one and bb.model.config.text_config.num_hidden_layers == 1
    assert bb.model.config.vision_config.depth == 1 and bb.model.config.vision_config.deepstack_visual_indexes == [0]
    # a checkpoint directory loads cut to num_layers (its first layers' weights)
    cut = load_backbone(full, num_layers=1)
    whole = load_backbone(full)
    assert cut.model.config.text_config.num_hidden_layers == 1 and len(cut.model.model.language_model.layers) == 1
    a = cut.model.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(a, whole.model.model.language_model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ConfigError, match="model.num_layers=3"):
        load_backbone(full, num_layers=3)
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(None, ["model.num_layers=-1"])
    from livr.cli import main

    assert main(["backbone", "make", "tiny-llava-onevision", str(tmp_path / "l1"), "--num-layers", "1"]) == 0
    with open(tmp_path / "l1" / "config.json") as f:
        c = json.load(f)
    assert c["text_config"]["num_hidden_layers"] == 1 and c["vision_config"]["num_hidden_layers"] == 1
    assert main(["backbone", "make", "no-such-preset", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_plan_image_tokens_equal_the_processor(name):
    """plan's per-image token count and pixel bytes = what the real processor class produces for a dummy image,
    alone and two to an example."""
    from livr.tools.plan_data import backbone_io, image_cost

    cfg, tok, ip = preset_parts(name, 2)
    fam = family_for(cfg.model_type)
    proc = make_processor(fam, ip, tok, cfg)
    io = backbone_io(load_config(None, [f"model.backbone={name}", "model.num_layers=2"]))
    for n in (1, 2):
        content = [{"type": "image"}] * n + [{"type": "text", "text": "hi"}]
        text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
        enc = proc(text=[text], images=[[_image(1024, 768, i) for i in range(n)]], return_tensors="pt")
        real = int((enc["input_ids"] == tok.convert_tokens_to_ids(fam.image_token)).sum())
        est = [image_cost(io, 1024, 768, n) for _ in range(n)]
        assert sum(e[0] for e in est) == real
        assert sum(e[1] for e in est) == enc["pixel_values"].numel() * 4


def test_plan_size_presets_from_images(capsys):
    """`livr plan` for the Qwen size presets at 4 x 1024x768: L ~ 4,200 (999 tokens per image) and ~ 3,250 (768),
    the labelled-positions-only logits, and host RAM per rank."""
    from livr.cli import main

    assert main(["plan", "model.backbone=size-qwen2.5-vl-3b", "--images", "4", "--image-size", "1024x768"]) == 0
    out = capsys.readouterr().out
    assert "4 × 999" in out and "host RAM per rank" in out and "peak RSS" in out
    assert main(["plan", "model.backbone=size-qwen2.5-vl-3b", "--images", "4", "--image-size", "1024x768",
                 "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    q = p["sequence"]
    assert 4100 <= q["seq_len"] <= 4300 and q["per_image"] == [999] * 4 and q["latents"] == 17
    assert q["pixel_bytes"] == 4 * 3996 * 1176 * 4  # fp32 pixel_values: ~18 MiB per image
    a = p["configured"]["checkpointing"]
    assert a["logits"] == q["labelled"] * 151936 * (2 + 8 + 4)  # only the labelled positions reach the head
    assert a["latent_rows"] == 2 * 151936 * 2048 * 2  # tied head: merged embedding + head copies
    h = p["host"]
    assert h["model_load"] == p["counts"]["total"] * 2 and h["loader_workers"] > 0 and h["prefetch"] > 0
    assert main(["plan", "model.backbone=size-qwen3-vl-4b", "--images", "4", "--image-size", "1024x768", "--json"]) == 0
    q3 = json.loads(capsys.readouterr().out)["sequence"]
    assert q3["per_image"] == [768] * 4 and 3150 <= q3["seq_len"] <= 3350


def test_plan_qwen35_size_presets(capsys):
    """`livr plan` on the Qwen3.5 size presets (their shipped configs, built on the meta device): the parameter
    counts of the published architectures, 35B-A3B's active parameters per token (~3B: 8 of 256 experts + the
    shared one), and Qwen3.5's 32-px merged patches (1024x768 -> 768 image tokens)."""
    from livr.cli import main

    assert main(["plan", "model.backbone=size-qwen3.5-4b", "--images", "1", "--image-size", "1024x768", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["counts"]["total"] == QWEN35_4B_PARAMS and "Qwen/Qwen3.5-4B" in p["counts"]["config_source"]
    assert p["sequence"]["per_image"] == [768] and p["counts"]["experts"] == 0
    assert main(["plan", "model.backbone=size-qwen3.5-35b-a3b", "--images", "1", "--image-size", "1024x768",
                 "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["counts"]
    assert c["total"] == QWEN35_35B_PARAMS and c["active"] == QWEN35_35B_ACTIVE
    assert c["experts"] == 40 * 256 * 3 * 2048 * 512 and c["experts_per_token"] == 8


def test_plan_sequence_from_the_data_equals_encoding(tmp_path):
    """From the configured data (synthetic rows here), plan's longest sequence = the longest encoded example."""
    from livr.data.synthetic import generate_task
    from livr.model.build import build_model
    from livr.tools.plan import plan
    cfg = load_config(None, ["model.backbone=tiny-qwen2.5-vl", f"model.cache_dir={tmp_path}", "model.device=cpu",
                             "data.tasks=[Counting, Jigsaw]", "data.image_size=112", "latents.num_latents=4",
                             "data.num_workers=2", f"data.cache_dir={tmp_path}/data"])
    p = plan(cfg, sample=3)
    q = p["sequence"]
    assert q["rows"] == 6 and "sampled train rows" in q["source"]
    lm = build_model(cfg)
    rows = [r for t in ("Counting", "Jigsaw") for r in generate_task(t, 3, seed=cfg.data.seed, image_size=112)]
    lengths = [lm.builder.encode(r)["input_ids"].shape[0] for r in rows]
    assert q["seq_len"] == max(lengths)
    assert q["pixel_bytes"] == max(lm.builder.encode(r)["pixel_values"].numel() * 4 for r in rows)
    assert p["setting"]["loader_workers"] == 2 and p["host"]["loader_workers"] == 2 * int(0.45 * 1024**3)
