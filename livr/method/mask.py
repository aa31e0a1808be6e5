"""The visual-bottleneck mask (Stage 1) built from token groups, on the model's device, vectorised.

Stage 1 = causal AND (PROMPT/ANSWER rows cannot see IMAGE columns) AND (no PAD columns). LATENT rows
see everything causally before them. The result is an *additive* float mask `[B, 1, L, L]`: 0 where
allowed, `finfo(dtype).min` where blocked (a boolean 4-D mask is silently wrong under `eager`).
Stage 2, SFT and plain inference use the 2-D padding mask, so fused attention kernels stay usable.
"""
from __future__ import annotations

import torch

from livr.method.groups import ANSWER, IMAGE, PAD, PROMPT


def query_positions(groups: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The sequence positions of the query rows: all L, or the last `rows` (a KV-cache decode step)."""
    n = groups.shape[1]
    return torch.arange(n - (rows or n), n, device=groups.device)


def causal_allowed(groups: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Boolean `[B, Q, L]`: a causal LM's own mask (causal, no PAD column; a pad row keeps its own diagonal, so no
    row is ever fully masked: no NaN under any kernel). Q = L, or the last `rows` query rows only (decoding builds
    just the new rows, never the whole L x L)."""
    q, k = query_positions(groups, rows), torch.arange(groups.shape[1], device=groups.device)
    valid = groups != PAD
    allowed = (k[None, :] <= q[:, None])[None] & valid[:, None, :]
    return allowed | ((k[None, :] == q[:, None])[None] & ~valid[:, -len(q):, None])


def bottleneck_blocked(groups: torch.Tensor, block_prompt: bool = True, rows: int | None = None) -> torch.Tensor:
    """Boolean `[B, Q, L]`: what the bottleneck forbids: PROMPT/ANSWER rows x IMAGE columns (Q as causal_allowed)."""
    blind_row = groups == ANSWER
    if block_prompt:
        blind_row = blind_row | (groups == PROMPT)
    if rows:
        blind_row = blind_row[:, -rows:]
    return blind_row[:, :, None] & (groups == IMAGE)[:, None, :]


def bottleneck_allowed(groups: torch.Tensor, block_prompt: bool = True) -> torch.Tensor:
    """Boolean `[B, L, L]`: may row i attend to column j under the Stage-1 bottleneck (of a causal LM)."""
    return causal_allowed(groups) & ~bottleneck_blocked(groups, block_prompt)


def additive(allowed: torch.Tensor, dtype: torch.dtype, rows: int | None = None) -> torch.Tensor:
    """Boolean `[B, L, L]` -> additive float `[B, 1, L, L]` (0 = attend, finfo.min = blocked); `rows`: only the
    last `rows` query rows (a KV-cache decode step)."""
    if rows is not None:
        allowed = allowed[:, -rows:]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def bottleneck_mask(groups: torch.Tensor, dtype: torch.dtype, block_prompt: bool = True) -> torch.Tensor:
    """Additive float mask `[B, 1, L, L]` for the Stage-1 visual bottleneck."""
    return additive(bottleneck_allowed(groups, block_prompt), dtype)


def same_example(segments: torch.Tensor) -> torch.Tensor:
    """Boolean [B, L, L]: query and key belong to the same example of a packed row (padding: to itself only)."""
    return segments[:, :, None] == segments[:, None, :]


def packed_allowed(family, model, groups: torch.Tensor, segments: torch.Tensor, bottleneck: bool):
    """The family's own rule AND same example AND (Stage 1) NOT prompt/answer rows x image columns: boolean
    [B, L, L], or a dict of them per layer type (families whose layers differ)."""
    keep = same_example(segments.to(groups.device))
    if bottleneck:
        keep = keep & ~bottleneck_blocked(groups)
    own = family.own_allowed(model, groups)
    return {k: a & keep for k, a in own.items()} if isinstance(own, dict) else own & keep
