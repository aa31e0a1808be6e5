"""The Stage-1 bottleneck with flex_attention (`model.attn_implementation=flex_attention`).

An additive 4-D mask forbids FlashAttention and makes transformers expand K/V for GQA; flex_attention keeps block
skipping and GQA. The bottleneck is a `mask_mod` over the batch's token groups (causal AND no pad column AND NOT
(prompt/answer row AND image column)), one `BlockMask` per batch shared by all layers. transformers refuses
`attn_implementation="flex_attention"` for the Qwen-VL classes, so livr registers its own attention function
(`livr_flex`) through `AttentionInterface`: it runs flex_attention when handed a BlockMask (Stage-1 forwards) and
transformers' SDPA otherwise (the vision tower, decoding, any 2-D-mask forward), so Stage 2, SFT and generation keep
the fused kernels. Compiled on CUDA; eager on CPU, where torch has no flex backward: Stage-1 *training* with flex
needs a GPU (a one-line error says so), forwards (verify's leak checks, eval) work.
Families whose own mask is not plain causal (Gemma 3: images both ways, sliding windows) are refused for now.
"""
from __future__ import annotations

import functools

import torch

from livr.method.groups import ANSWER, IMAGE, PAD, PROMPT

NAME = "livr_flex"  # the registered implementation; users write model.attn_implementation=flex_attention


def impl_name(name: str) -> str:
    """The transformers attention implementation for a config value (registering livr's flex function)."""
    if name != "flex_attention":
        return name
    register()
    return NAME


@functools.cache
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, flex_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # 2-D masks become what the SDPA fallback takes


@functools.cache
def _flex():
    """flex_attention, compiled on CUDA (or anywhere with LIVR_FLEX_COMPILE=1: on CPU the first call of each shape
    compiles for tens of seconds, so CPU forwards default to the eager, unfused implementation). Compiled with
    dynamic shapes: every sequence length and batch size of a run shares one graph (measured on CPU/inductor for
    L 351-4197 and batches 1 and 8: one graph; tests/model/test_gpu_readiness.py), so lengths need no padding or buckets."""
    import os

    from torch.nn.attention.flex_attention import flex_attention

    compile_ = torch.cuda.is_available() or os.environ.get("LIVR_FLEX_COMPILE") == "1"
    return torch.compile(flex_attention, dynamic=True) if compile_ else flex_attention


def flex_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: [B, H, L, D] in, ([B, L, H, D], None) out."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        raise RuntimeError("model.attn_implementation=flex_attention: torch has no flex_attention backward on CPU; "
                           "train Stage 1 with sdpa there (flex needs a GPU to train)")
    # past dynamo's recompile limit a compiled function silently runs eager (the unfused reference: memory ~ L²);
    # here that is an error instead
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        out = _flex()(query, key, value, block_mask=attention_mask, scale=scaling,
                      enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def check_trainable(cfg) -> None:
    """A one-line ConfigError when a run would train Stage 1 under flex_attention on a CPU."""
    from livr.config import ConfigError
    from livr.model.device import resolve_device

    stage1 = cfg.train.mode == "livr" and (cfg.train.stage1_steps > 0 or cfg.train.stage1_epochs > 0)
    if cfg.model.attn_implementation == "flex_attention" and stage1 and resolve_device(cfg.model.device).type == "cpu":
        raise ConfigError("config: model.attn_implementation='flex_attention': torch has no flex_attention backward "
                          "on CPU, so Stage 1 cannot train there; use sdpa on a CPU (flex trains on a GPU)")


def block_mask(family, groups: torch.Tensor, block_prompt: bool = True):
    """The Stage-1 bottleneck for a causal LM as a BlockMask over `groups` [B, L]."""
    from torch.nn.attention.flex_attention import create_block_mask

    from livr.backbones.base import Family

    if type(family).own_allowed is not Family.own_allowed:
        raise ValueError(f"model.attn_implementation=flex_attention: family {family.name} has its own attention rules "
                         "(not plain causal); use sdpa for its Stage 1")
    valid = groups != PAD
    blind = (groups == ANSWER) | ((groups == PROMPT) if block_prompt else torch.zeros_like(valid))
    image = groups == IMAGE

    def mask_mod(b, h, q, kv):
        own = ((kv <= q) & valid[b, kv]) | ((q == kv) & ~valid[b, q])  # a pad row keeps its diagonal: no NaN
        return own & ~(blind[b, q] & image[b, kv])

    n = groups.shape[1]
    return create_block_mask(mask_mod, groups.shape[0], None, n, n, device=groups.device)


def is_block_mask(mask) -> bool:
    from torch.nn.attention.flex_attention import BlockMask

    return isinstance(mask, BlockMask)


def allowed(mask) -> torch.Tensor:
    """Boolean [B, 1, Q, KV] token-level view of a BlockMask (its mask_mod evaluated on every pair; checks only)."""
    from torch.nn.attention.flex_attention import create_mask

    b, _, q, kv = mask.shape
    return create_mask(mask.mask_mod, b, None, q, kv, device=mask.kv_num_blocks.device)


def packed_block_mask(family, groups: torch.Tensor, segments: torch.Tensor, bottleneck: bool):
    """`packed_allowed` for a causal LM as a flex BlockMask (document ids: no attention across examples)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from livr.backbones.base import Family

    if type(family).own_allowed is not Family.own_allowed:
        raise ValueError(f"data.packing with flex_attention: family {family.name} has its own attention rules; use sdpa")
    segments = segments.to(groups.device)
    valid = groups != PAD
    blind = ((groups == ANSWER) | (groups == PROMPT)) if bottleneck else torch.zeros_like(valid)
    image = groups == IMAGE

    def mask_mod(b, h, q, kv):
        own = ((kv <= q) & valid[b, kv] & (segments[b, q] == segments[b, kv])) | ((q == kv) & ~valid[b, q])
        return own & ~(blind[b, q] & image[b, kv])

    n = groups.shape[1]
    return create_block_mask(mask_mod, groups.shape[0], None, n, n, device=groups.device)
