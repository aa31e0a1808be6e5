"""Qwen3.5 (e.g. Qwen/Qwen3.5-4B): a hybrid VLM, Gated DeltaNet (linear-attention) layers and full-attention layers.

The Stage-1 bottleneck reaches the two layer types differently (livr/backbones/gated_deltanet.py): the
full-attention layers take the additive 4-D Stage-1 mask; the Gated DeltaNet layers run two recurrences (the stock
one, and an image-blind one read by prompt and answer positions). So the family's masks are a dict per layer type,
as transformers' Qwen3.5 text model takes them; the "linear_attention" entry is the same additive mask tagged with
the token groups. Stage 2, SFT and stock inference pass a 2-D mask and run the model unchanged. A packed row
(`data.packing`) has block-diagonal masks, the linear entry tagged with the segments too: each example's slice runs
through the Gated DeltaNet layers from a fresh state.

Chat format (the checkpoint's chat template): ChatML with `<|vision_start|><|image_pad|><|vision_end|>` per image,
no default system prompt; the generation prompt is `<|im_start|>assistant\\n<think>\\n` (thinking on by default), so
the K latents and the delimiter sit in the open think block and the answer follows.
"""
from typing import ClassVar

from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

from .. import gated_deltanet
from ..base import register, set_token_ids, shipped_config, truncate_text
from ..tokenizer import IM_END, IM_START, PAD, build_tokenizer
from .qwen2_5_vl import QWEN_FROZEN_REGEX, QwenVL, qwen_token_ids

QWEN35_SPECIALS = [PAD, IM_START, IM_END, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                   "<think>", "</think>"]
# the checkpoint's template, reduced to what livr renders (user turns with images and text; assistant turns; the
# generation prompt with thinking on unless enable_thinking=false)
QWEN35_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
# LM projections: full-attention q/k/v/o, Gated DeltaNet in_proj_{qkv,z,b,a} / out_proj, the MLP (dense) or the
# shared expert's MLP (MoE; the routed experts are 3-D parameters: lora.expert_targets)
HYBRID_LORA_REGEX = (r"(.*\.)?language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|"
                     r"linear_attn\.(in_proj_(qkv|z|b|a)|out_proj)|mlp\.(shared_expert\.)?(gate|up|down)_proj)")
GDN_PROJ = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
TINY_LAYERS = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]


class HybridQwen(QwenVL):
    """What Qwen3.5 dense and MoE share: the two layer types, their masks, the Gated DeltaNet bottleneck."""

    processor_class = Qwen3VLProcessor
    assistant_header = "<|im_start|>assistant\n<think>\n"
    lora_target_regex = HYBRID_LORA_REGEX
    frozen_module_regex = QWEN_FROZEN_REGEX
    image_processor_class = Qwen2VLImageProcessorPil
    gdn_class: ClassVar[type] = Qwen3_5GatedDeltaNet
    layer_kinds: ClassVar[tuple[str, ...]] = ("full_attention", "linear_attention")  # what livr knows how to mask
    image_processor_defaults: ClassVar[dict] = {"min_pixels": 65536, "max_pixels": 16777216, "patch_size": 16,
                                                "temporal_patch_size": 2, "merge_size": 2,
                                                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

    def __init__(self):
        gated_deltanet.install(self.gdn_class)

    def lora_targets(self, targets: list[str]) -> list[str]:
        """Where the configured names include attention projections, the Gated DeltaNet projections too."""
        if set(targets) & {"q_proj", "k_proj", "v_proj", "o_proj"}:
            return [*targets, *(t for t in GDN_PROJ if t not in targets)]
        return list(targets)

    def own_allowed(self, model, groups, rows=None):
        """Causal for both layer types (the linear layers' "mask" only carries the token groups to them)."""
        from livr.method.mask import causal_allowed

        own = causal_allowed(groups, rows)
        return GroupsDict(groups, False, {"full_attention": own, "linear_attention": own})

    def stage1_mask(self, model, groups, dtype, rows=None):
        from livr.method.mask import bottleneck_blocked

        from ..base import _inner_with

        unknown = set(_inner_with(model, "get_rope_index").config.get_text_config().layer_types) - set(self.layer_kinds)
        if unknown:
            raise ValueError(f"{self.name}: layer types {sorted(unknown)} have no Stage-1 bottleneck in livr "
                             f"(known: {list(self.layer_kinds)})")

        own = self.own_allowed(model, groups, rows)["full_attention"]
        allowed = own & ~bottleneck_blocked(groups, rows=rows)
        return self.as_mask(model, GroupsDict(groups, True, {"full_attention": allowed, "linear_attention": allowed}),
                            dtype, rows)

    def as_mask(self, model, allowed, dtype, rows=None):
        from livr.method.mask import additive

        out = {kind: additive(a, dtype, rows) for kind, a in allowed.items()}
        if isinstance(allowed, GroupsDict):
            gated_deltanet.tag(out["linear_attention"], allowed.groups, allowed.bottleneck)
        return out

    def packed_mask(self, model, groups, segments, bottleneck, dtype):
        """The block-diagonal masks of a packed row; the Gated DeltaNet layers' entry also carries the segments, so
        that each example runs from a fresh state (gated_deltanet.py)."""
        out = super().packed_mask(model, groups, segments, bottleneck, dtype)
        gated_deltanet.tag(out["linear_attention"], groups, bottleneck, segments)
        return out

    def init_random(self, model) -> None:
        """transformers draws each Gated DeltaNet head's decay rate A from U(0.01, 16): at a random init most heads
        forget within a few tokens, so a random preset could not show what reaches (or leaks into) a later position.
        A random preset draws A from U(0.01, 0.5) (trained checkpoints keep many slow heads)."""
        import torch

        for m in model.modules():
            if isinstance(m, self.gdn_class):
                with torch.no_grad():
                    m.A_log.copy_(torch.empty_like(m.A_log).uniform_(0.01, 0.5).log())

    def truncate_depth(self, cfg, n: int):
        """The first n decoder layers (their linear/full pattern kept) and the first min(n, depth) vision blocks."""
        truncate_text(cfg.get_text_config(), n)
        cfg.vision_config.depth = min(n, cfg.vision_config.depth)
        return cfg

    def size_parts(self):
        tok = build_tokenizer(QWEN35_SPECIALS, QWEN35_TEMPLATE)
        cfg = shipped_config(self.hub_id)
        set_token_ids(cfg, tok, qwen_token_ids(tok))
        return cfg, tok, self.image_processor_class(**self.image_processor_defaults)

    def tiny_text(self, tok) -> dict:
        return {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": len(TINY_LAYERS),
                "layer_types": list(TINY_LAYERS), "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
                "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "max_position_embeddings": 4096,
                "initializer_range": 0.1, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True,
                # partial rotary 0.25 of head_dim 32 = 8 dims, 4 frequencies: interleaved T/H/W sections [2, 1, 1]
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                    "mrope_section": [2, 1, 1], "mrope_interleaved": True}}

    def tiny_vision(self) -> dict:
        return {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
                "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
                "num_position_embeddings": 64, "initializer_range": 0.1}

    def tiny_parts(self):
        """4 decoder layers (Gated DeltaNet, Gated DeltaNet, full attention, Gated DeltaNet), hidden 64, tied
        embeddings; vision like tiny-qwen3-vl (patch 16, merge 2: 112x112 -> 16 tokens, capped at 256x256)."""
        tok = build_tokenizer(QWEN35_SPECIALS, QWEN35_TEMPLATE)
        cfg = self.config_class(text_config=self.tiny_text(tok), vision_config=self.tiny_vision(),
                                tie_word_embeddings=True, initializer_range=0.1, **qwen_token_ids(tok))
        ip = Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=256 * 256, patch_size=16, merge_size=2,
                                      temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return cfg, tok, ip


class GroupsDict(dict):
    """{layer type: boolean [B, Q, L]} plus the token groups and whether the bottleneck applies (for as_mask)."""

    def __init__(self, groups, bottleneck: bool, masks: dict):
        super().__init__(masks)
        self.groups, self.bottleneck = groups, bottleneck


@register
class Qwen3_5(HybridQwen):
    name = "qwen3_5"
    model_types = ("qwen3_5",)
    model_class = Qwen3_5ForConditionalGeneration
    config_class = Qwen3_5Config
    tiny_preset, size_preset, hub_id = "tiny-qwen3.5", "size-qwen3.5-4b", "Qwen/Qwen3.5-4B"
