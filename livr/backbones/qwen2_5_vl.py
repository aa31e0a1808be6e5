"""Qwen2.5-VL (e.g. Qwen/Qwen2.5-VL-3B-Instruct): facts, the tiny preset and the real-size preset."""
import json
import os

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .base import Family, random_model
from .tokenizer import IM_END, IM_START, PAD, build_tokenizer, qwen_template

# LM projections only: vision blocks are `model.visual.blocks.N.attn.qkv/proj`, `mlp.gate_proj/up_proj/down_proj`
# (so a bare name list would hit the vision MLP); the LM lives under `model.language_model.layers.N`.
QWEN_LORA_REGEX = r"(.*\.)?language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# vision tower + patch merger (the projector) + Qwen3-VL's deepstack mergers all live under `model.visual`.
QWEN_FROZEN_REGEX = r"(.*\.)?visual(\..*)?"
QWEN_SPECIALS = [PAD, IM_START, IM_END, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

FAMILY = Family(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class=Qwen2_5_VLForConditionalGeneration,
    image_token="<|image_pad|>",
    assistant_header="<|im_start|>assistant\n",
    end_of_turn="<|im_end|>",
    lora_target_regex=QWEN_LORA_REGEX,
    frozen_module_regex=QWEN_FROZEN_REGEX,
    forward_keys=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    processor_class=Qwen2_5_VLProcessor,
    image_processor_class=Qwen2VLImageProcessorPil,
    mrope=True,
)

TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 4096, "initializer_range": 0.1}


def qwen_token_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def tiny_parts():
    """(config, tokenizer, image_processor) of the tiny preset. patch 14, merge 2 -> a 56x56 image is 4 tokens,
    112x112 is 16; min_pixels 56*56 and max_pixels 224*224 keep 112x112 unresized and cap larger images near
    224x224 (64 tokens)."""
    tok = build_tokenizer(QWEN_SPECIALS, qwen_template(default_system=True))
    text = {**TINY_TEXT, "vocab_size": len(tok), "bos_token_id": None, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 64,
              "fullatt_block_indexes": [1], "initializer_range": 0.1}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           initializer_range=0.1, **qwen_token_ids(tok))
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    return cfg, tok, ip


def build_tiny(seed: int = 0, attn_implementation: str = "sdpa"):
    """(model, tokenizer, image_processor) of the tiny preset (see tiny_parts)."""
    cfg, tok, ip = tiny_parts()
    return random_model(FAMILY, cfg, tok, seed, attn_implementation), tok, ip


# ----------------------------------------------------------------------------- the real-size preset
SHIPPED = os.path.join(os.path.dirname(__file__), "configs")
HUB_ID = "Qwen/Qwen2.5-VL-3B-Instruct"
# preprocessor_config.json of Qwen/Qwen2.5-VL-3B-Instruct (patch 14, merge 2: one token per 28x28 pixels)
IMAGE_PROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]}


def shipped_config(hub_id: str):
    """The transformers config of a hub checkpoint from the copy in livr/backbones/configs (None if not shipped)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = os.path.join(SHIPPED, hub_id.replace("/", "__") + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)


def set_token_ids(cfg, tok, top_level: dict) -> None:
    """Point a real-size config at the offline tokenizer's special tokens (the vocab size stays the checkpoint's:
    rows beyond len(tokenizer) are unused padding, as in the real checkpoints)."""
    for k, v in top_level.items():
        setattr(cfg, k, v)
    text = cfg.get_text_config()
    text.bos_token_id, text.eos_token_id, text.pad_token_id = None, tok.eos_token_id, tok.pad_token_id


def truncate_text(text, n: int) -> None:
    text.num_hidden_layers = n
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types[:n])
    if getattr(text, "max_window_layers", None) is not None:
        text.max_window_layers = min(text.max_window_layers, n)


def depth(cfg) -> int:
    return cfg.get_text_config().num_hidden_layers


def truncate_qwen(cfg, n: int, special_blocks: str):
    """The first n decoder layers and the first min(n, depth) vision blocks (in place; returns cfg). The vision
    blocks listed in `special_blocks` (a vision-config attribute) stay where < n; if none is left, the last
    block gets the role, so that code path still runs at any depth."""
    truncate_text(cfg.get_text_config(), n)
    v = cfg.vision_config
    if n < v.depth:
        setattr(v, special_blocks, [i for i in getattr(v, special_blocks) if i < n] or [n - 1])
        v.depth = n
    return cfg


def truncate_depth(cfg, n: int):
    """Qwen2.5-VL: the full-attention vision blocks (the real tower's last block is one) are the special ones."""
    return truncate_qwen(cfg, n, "fullatt_block_indexes")


def size_parts(num_layers: int = 0):
    """(config, tokenizer, image_processor) of size-qwen2.5-vl-3b: Qwen/Qwen2.5-VL-3B-Instruct's architecture
    (livr/backbones/configs), the offline BPE tokenizer with the family's special tokens and chat template, and the
    checkpoint's image processor settings."""
    tok = build_tokenizer(QWEN_SPECIALS, qwen_template(default_system=True))
    cfg = shipped_config(HUB_ID)
    set_token_ids(cfg, tok, qwen_token_ids(tok))
    if num_layers:
        truncate_depth(cfg, num_layers)
    return cfg, tok, Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR)
