"""Which attention kernel each part of the model runs (`model.attn_implementation*`), resolved for the device.

- Stage 1 (the bottleneck: a 4-D mask or a flex BlockMask): `auto` is flex_attention on CUDA (block-sparse, GQA
  without K/V copies; `livr/model/flex.py`) and sdpa on a CPU (torch has no flex backward there); a family with its own
  attention rules (Gemma 3) gets sdpa. `sdpa`, `eager`, `flex_attention` as given.
- Stage 2, SFT and inference: `model.attn_implementation_stage2`, "" = Stage 1's.
- The vision tower: `model.attn_implementation_vision`; `auto` is FlashAttention 2 on CUDA where flash-attn imports
  (Qwen2.5-VL's windowed tower then runs one varlen call per layer instead of one per window), else sdpa. The
  tower never takes livr's mask, so any kernel fits it; it is set per sub-config (`vision_config`) and kept when
  the language model switches between stages.
A kernel that cannot load (flash-attn missing, or a CUDA-only kernel on a CPU) is a one-line ConfigError before
anything loads (`check`); evaluation under the bottleneck runs Stage 1's kernel (`LivrModel.bottleneck_attention`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from livr.backbones.base import flex_capable

FLASH = ("flash_attention_2", "flash_attention_3")
MASK_KERNELS = ("sdpa", "eager", "flex_attention")  # kernels that take livr's Stage-1 mask


@dataclass(frozen=True)
class AttentionPlan:
    stage1: str  # sdpa | eager | flex_attention
    stage2: str  # also flash_attention_2 / flash_attention_3
    vision: str  # sdpa | eager | flash_attention_2 | flash_attention_3

    def implementation(self, name: str, config_class) -> str | dict:
        """What `from_pretrained` / `set_attn_implementation` take for the language model running `name`: a dict
        per sub-config that keeps the vision tower's own kernel (a plain name where the config has no vision part)."""
        from livr.model import flex

        lm = flex.impl_name(name)
        subs = getattr(config_class, "sub_configs", None) or {}
        if "vision_config" not in subs:
            return lm
        plan = {"": lm, "vision_config": self.vision}
        if "text_config" in subs:
            plan["text_config"] = lm
        return plan


def flash_available(name: str) -> bool:
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    return {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}[name]()


def resolve(cfg, device: torch.device, family=None) -> AttentionPlan:
    """The plan for `cfg.model` on `device`; `family` (livr.backbones.base.Family) refuses flex when its own mask
    is not plain causal."""
    m, cuda = cfg.model, device.type == "cuda"
    stage1 = m.attn_implementation
    if stage1 == "auto":
        stage1 = "flex_attention" if cuda and (family is None or flex_capable(family)) else "sdpa"
    vision = m.attn_implementation_vision
    if vision == "auto":
        vision = "flash_attention_2" if cuda and flash_available("flash_attention_2") else "sdpa"
    return AttentionPlan(stage1, m.attn_implementation_stage2 or stage1, vision)


def check(cfg, device: torch.device, training: bool = False) -> None:
    """One-line ConfigErrors, before anything loads: a FlashAttention kernel that does not import or has no CUDA
    device; with `training`, Stage 1 under flex_attention on a CPU (forwards run there, the backward does not)."""
    from livr.config import ConfigError
    from livr.model import flex

    m = cfg.model
    for key, value in (("attn_implementation_stage2", m.attn_implementation_stage2),
                       ("attn_implementation_vision", m.attn_implementation_vision)):
        if value in FLASH and (device.type != "cuda" or not flash_available(value)):
            why = "it needs a CUDA device" if device.type != "cuda" else "the flash-attn package does not import here"
            raise ConfigError(f"config: model.{key}={value!r}: {why} (pip install flash-attn for FlashAttention 2, "
                              "or use sdpa)")
    if training:
        flex.check_trainable(cfg)
