"""Qwen2.5-VL (e.g. Qwen/Qwen2.5-VL-3B-Instruct): facts + the tiny preset."""
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .base import Family
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


def set_generation_ids(model, tok):
    g = model.generation_config
    g.pad_token_id = tok.pad_token_id
    g.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    g.bos_token_id = None


def build_tiny(seed: int = 0, attn_implementation: str = "sdpa"):
    """(model, tokenizer, image_processor). patch 14, merge 2 -> a 56x56 image is 4 tokens, 112x112 is 16;
    min_pixels 56*56 and max_pixels 224*224 keep 112x112 unresized and cap larger images near 224x224 (64 tokens)."""
    tok = build_tokenizer(QWEN_SPECIALS, qwen_template(default_system=True))
    text = {**TINY_TEXT, "vocab_size": len(tok), "bos_token_id": None, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 64,
              "fullatt_block_indexes": [1], "initializer_range": 0.1}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           initializer_range=0.1, **qwen_token_ids(tok))
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation=attn_implementation)
    set_generation_ids(model, tok)
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    return model, tok, ip
