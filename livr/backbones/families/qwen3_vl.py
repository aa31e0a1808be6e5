"""Qwen3-VL (e.g. Qwen/Qwen3-VL-4B-Instruct): the family, its tiny preset and its real-size preset."""
from typing import ClassVar

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..base import register
from ..tokenizer import build_tokenizer, qwen_template
from .qwen2_5_vl import QWEN_SPECIALS, TINY_TEXT, QwenVL, qwen_token_ids

# the tiny Qwen3-VL vision tower and image processor (shared by tiny-qwen3-vl-moe)
TINY_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
               "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64, "num_position_embeddings": 64,
               "deepstack_visual_indexes": [0], "initializer_range": 0.1}


def tiny_image_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=256 * 256, patch_size=16, merge_size=2,
                                    temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)

@register
class Qwen3_VL(QwenVL):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    model_class = Qwen3VLForConditionalGeneration
    processor_class = Qwen3VLProcessor
    special_blocks = "deepstack_visual_indexes"  # the DeepStack taps
    default_system = False
    tiny_preset, size_preset, hub_id = "tiny-qwen3-vl", "size-qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct"
    # preprocessor_config.json of the Qwen3-VL checkpoints (patch 16, merge 2: one token per 32x32 pixels; the
    # pixel bounds are stored as size.shortest_edge / size.longest_edge)
    image_processor_defaults: ClassVar[dict] = {"min_pixels": 65536, "max_pixels": 16777216, "patch_size": 16,
                                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                                "image_std": [0.5, 0.5, 0.5]}

    def tiny_parts(self):
        """Like the real 4B: patch 16, merge 2 (factor 32), interleaved mRoPE, deepstack, tied embeddings. A 112x112
        image is resized to 128x128 -> 16 tokens, 64x64 -> 4 tokens; max_pixels 256*256 caps large images at 64."""
        tok = build_tokenizer(QWEN_SPECIALS, qwen_template(default_system=False))
        # interleaved mRoPE over head_dim/2 = 8 frequencies: H takes 1,4; W takes 2,5; T the rest (section [4,2,2])
        text = {**TINY_TEXT, "head_dim": 16, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                    "mrope_interleaved": True}}
        cfg = Qwen3VLConfig(text_config=text, vision_config=dict(TINY_VISION), tie_word_embeddings=True,
                            initializer_range=0.1, **qwen_token_ids(tok))
        return cfg, tok, tiny_image_processor()
