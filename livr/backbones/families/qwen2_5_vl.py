"""Qwen2.5-VL (e.g. Qwen/Qwen2.5-VL-3B-Instruct): the family, its tiny preset and its real-size preset."""
from typing import ClassVar

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..base import Family, register, set_token_ids, shipped_config, truncate_text
from ..tokenizer import IM_END, IM_START, PAD, build_tokenizer, qwen_template

# LM projections only: vision blocks are `model.visual.blocks.N.attn.qkv/proj`, `mlp.gate_proj/up_proj/down_proj`
# (so a bare name list would hit the vision MLP); the LM lives under `model.language_model.layers.N`.
QWEN_LORA_REGEX = r"(.*\.)?language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# vision tower + patch merger (the projector) + Qwen3-VL's deepstack mergers all live under `model.visual`.
QWEN_FROZEN_REGEX = r"(.*\.)?visual(\..*)?"
QWEN_SPECIALS = [PAD, IM_START, IM_END, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 4096, "initializer_range": 0.1}


def qwen_token_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


class QwenVL(Family):
    """What Qwen2.5-VL and Qwen3-VL share: ChatML, <|image_pad|>, mRoPE, everything visual under `model.visual`."""

    image_token = "<|image_pad|>"
    assistant_header = "<|im_start|>assistant\n"
    end_of_turn = "<|im_end|>"
    forward_keys = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
    rope = "mrope"
    lora_target_regex = QWEN_LORA_REGEX
    frozen_module_regex = QWEN_FROZEN_REGEX
    image_processor_class = Qwen2VLImageProcessorPil
    special_blocks = ""  # the vision-config list of blocks with a role (kept by truncate_depth)

    def truncate_depth(self, cfg, n: int):
        """The first n decoder layers and the first min(n, depth) vision blocks (in place). The vision blocks in
        `special_blocks` stay where < n; if none is left, the last block gets the role, so that path still runs."""
        truncate_text(cfg.get_text_config(), n)
        v = cfg.vision_config
        if n < v.depth:
            setattr(v, self.special_blocks, [i for i in getattr(v, self.special_blocks) if i < n] or [n - 1])
            v.depth = n
        return cfg

    def size_parts(self):
        """The hub checkpoint's architecture (livr/backbones/configs), the offline BPE tokenizer with the family's
        special tokens and chat template, and the checkpoint's image processor settings."""
        tok = build_tokenizer(QWEN_SPECIALS, qwen_template(default_system=self.default_system))
        cfg = shipped_config(self.hub_id)
        set_token_ids(cfg, tok, qwen_token_ids(tok))
        return cfg, tok, self.image_processor_class(**self.image_processor_defaults)


@register
class Qwen2_5_VL(QwenVL):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor
    special_blocks = "fullatt_block_indexes"  # the full-attention vision blocks (the real tower's last is one)
    default_system = True
    tiny_preset, size_preset, hub_id = "tiny-qwen2.5-vl", "size-qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct"
    # its preprocessor_config.json (patch 14, merge 2: one token per 28x28 pixels)
    image_processor_defaults: ClassVar[dict] = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                                "temporal_patch_size": 2, "merge_size": 2,
                                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                                "image_std": [0.26862954, 0.26130258, 0.27577711]}

    def tiny_parts(self):
        """patch 14, merge 2 -> a 56x56 image is 4 tokens, 112x112 is 16; min_pixels 56*56 and max_pixels 224*224
        keep 112x112 unresized and cap larger images near 224x224 (64 tokens)."""
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
