"""Qwen3.5-MoE (e.g. Qwen/Qwen3.5-35B-A3B): Qwen3.5's hybrid layers (Gated DeltaNet + full attention, the same
two-recurrence Stage-1 bottleneck: livr/backbones/gated_deltanet.py) with a sparse MoE MLP in every layer (routed
experts as fused 3-D parameters, a router `mlp.gate`, and a shared expert). LoRA targets the attention and Gated
DeltaNet projections and the shared expert's MLP; the router is never trained."""
from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet

from ..base import register
from .qwen3_5 import HybridQwen


@register
class Qwen3_5_Moe(HybridQwen):
    name = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)
    model_class = Qwen3_5MoeForConditionalGeneration
    config_class = Qwen3_5MoeConfig
    gdn_class = Qwen3_5MoeGatedDeltaNet
    tiny_preset, size_preset = "tiny-qwen3.5-moe", "size-qwen3.5-35b-a3b"
    hub_id = "Qwen/Qwen3.5-35B-A3B"

    def tiny_text(self, tok) -> dict:
        """tiny-qwen3.5's layers with a MoE MLP: 4 experts of width 32, 2 per token, a shared expert of width 32."""
        text = super().tiny_text(tok)
        del text["intermediate_size"]
        return {**text, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 32}
