"""Qwen3-VL (e.g. Qwen/Qwen3-VL-4B-Instruct): facts, the tiny preset and the real-size preset."""
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .base import Family, random_model
from .qwen2_5_vl import (
    QWEN_FROZEN_REGEX,
    QWEN_LORA_REGEX,
    QWEN_SPECIALS,
    TINY_TEXT,
    depth,
    qwen_token_ids,
    set_token_ids,
    shipped_config,
    truncate_qwen,
)
from .tokenizer import build_tokenizer, qwen_template

FAMILY = Family(
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    model_class=Qwen3VLForConditionalGeneration,
    image_token="<|image_pad|>",
    assistant_header="<|im_start|>assistant\n",
    end_of_turn="<|im_end|>",
    lora_target_regex=QWEN_LORA_REGEX,
    frozen_module_regex=QWEN_FROZEN_REGEX,
    forward_keys=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    processor_class=Qwen3VLProcessor,
    image_processor_class=Qwen2VLImageProcessorPil,
    mrope=True,
)


def tiny_parts():
    """(config, tokenizer, image_processor) of the tiny preset. Like the real 4B: patch 16, merge 2 (factor 32),
    interleaved mRoPE, deepstack, tied embeddings. A 112x112 image is resized to 128x128 -> 16 tokens, 64x64 -> 4
    tokens; max_pixels 256*256 caps large images at 64 tokens."""
    tok = build_tokenizer(QWEN_SPECIALS, qwen_template(default_system=False))
    # interleaved mRoPE over head_dim/2 = 8 frequencies: H takes 1,4; W takes 2,5; T the rest (section [4,2,2])
    text = {**TINY_TEXT, "head_dim": 16, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                "mrope_interleaved": True}}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0], "initializer_range": 0.1}
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                        initializer_range=0.1, **qwen_token_ids(tok))
    ip = Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=256 * 256, patch_size=16, merge_size=2,
                                  temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return cfg, tok, ip


def build_tiny(seed: int = 0, attn_implementation: str = "sdpa"):
    """(model, tokenizer, image_processor) of the tiny preset (see tiny_parts)."""
    cfg, tok, ip = tiny_parts()
    return random_model(FAMILY, cfg, tok, seed, attn_implementation), tok, ip


# ----------------------------------------------------------------------------- the real-size preset
HUB_ID = "Qwen/Qwen3-VL-4B-Instruct"
# preprocessor_config.json of the Qwen3-VL checkpoints (patch 16, merge 2: one token per 32x32 pixels; the pixel
# bounds are stored as size.shortest_edge / size.longest_edge)
IMAGE_PROCESSOR = {"min_pixels": 65536, "max_pixels": 16777216, "patch_size": 16, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def truncate_depth(cfg, n: int):
    """Qwen3-VL: the DeepStack taps are the special vision blocks (see truncate_qwen)."""
    return truncate_qwen(cfg, n, "deepstack_visual_indexes")


def size_parts(num_layers: int = 0):
    """(config, tokenizer, image_processor) of size-qwen3-vl-4b: Qwen/Qwen3-VL-4B-Instruct's architecture (tied
    head; livr/backbones/configs), the offline BPE tokenizer with the family's special tokens and chat template, and
    the checkpoint's image processor settings."""
    tok = build_tokenizer(QWEN_SPECIALS, qwen_template(default_system=False))
    cfg = shipped_config(HUB_ID)
    set_token_ids(cfg, tok, qwen_token_ids(tok))
    if num_layers:
        truncate_depth(cfg, num_layers)
    return cfg, tok, Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR)


__all__ = ["FAMILY", "HUB_ID", "IMAGE_PROCESSOR", "build_tiny", "depth", "size_parts",
           "tiny_parts", "truncate_depth"]
