"""Qwen3-VL-MoE (e.g. Qwen/Qwen3-VL-30B-A3B-Instruct): Qwen3-VL (ChatML, <|image_pad|>, interleaved mRoPE, DeepStack)
with a sparse MoE MLP in every decoder layer: routed experts as fused 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`) and a router `mlp.gate`; no shared expert. LoRA targets the attention projections (and a
dense MLP where a layer has one); the experts take LoRA only with `lora.expert_targets`; the router never trains."""
from typing import ClassVar

from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor

from .. import experts
from ..base import register
from ..tokenizer import build_tokenizer, qwen_template
from .qwen2_5_vl import QWEN_SPECIALS, TINY_TEXT, qwen_token_ids
from .qwen3_vl import TINY_VISION, Qwen3_VL, tiny_image_processor


@register
class Qwen3_VL_Moe(Qwen3_VL):
    name = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    model_class = Qwen3VLMoeForConditionalGeneration
    processor_class = Qwen3VLProcessor
    tiny_preset, size_preset = "tiny-qwen3-vl-moe", "size-qwen3-vl-30b-a3b"
    hub_id = "Qwen/Qwen3-VL-30B-A3B-Instruct"
    # its preprocessor_config.json: the Qwen3-VL processor settings (patch 16, merge 2)
    image_processor_defaults: ClassVar[dict] = Qwen3_VL.image_processor_defaults

    def __init__(self):
        experts.fix_zero3_expert_layout()  # its fused experts load transposed under ZeRO-3 otherwise

    def tiny_parts(self):
        """tiny-qwen3-vl's shape with a MoE MLP in both layers (4 experts of width 32, 2 per token) and an untied
        head, like the real 30B-A3B."""
        tok = build_tokenizer(QWEN_SPECIALS, qwen_template(default_system=False))
        text = {**TINY_TEXT, "head_dim": 16, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id, "tie_word_embeddings": False, "num_experts": 4,
                "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                    "mrope_interleaved": True}}
        cfg = Qwen3VLMoeConfig(text_config=text, vision_config=dict(TINY_VISION), tie_word_embeddings=False,
                               initializer_range=0.1, **qwen_token_ids(tok))
        return cfg, tok, tiny_image_processor()
