"""Packing a rank's share of a global batch into few long rows, the bottleneck kept per example (`data.packing`).

- `plan_packs(lengths, max_tokens)`: first-fit decreasing: examples sorted by length (longest first), each put
  into the first pack it fits into (total length <= max_tokens), else a new pack; an example is never split, one
  longer than max_tokens has a pack of its own.
- `collate_packed(items, pad_id, max_tokens)`: the encoded examples of one optimizer step of this rank -> a list of
  micro-batches, one pack each (one row; the packs of a step are padded to their own length only). Every
  per-token tensor is the examples' own concatenated (input ids, labels, groups, the processor's token types),
  positions too: each example keeps the positions the family's own position function gave it alone (mRoPE
  included), so they restart at every example. Image tensors are concatenated in order as `collate` does.
  `segments` [1, L] numbers the examples of the row (-1 on padding); `seq_lens` their lengths.
The mask that keeps packed examples apart is the method's: `livr.method.mask.packed_allowed` (4-D) and
`livr.model.flex.packed_block_mask` (a flex BlockMask with document ids). Recurrent (Gated DeltaNet) layers have no
attention to mask: they run each example of the row from a fresh state (livr/backbones/gated_deltanet.py).
The loss normalisation is that of `train_step` (total NLL / labelled tokens of the global batch): a step's
gradient does not depend on how its examples are packed. Labels stay per example: the first token of an example
is never labelled, so no position predicts across an example boundary.
"""
from __future__ import annotations

import torch

from livr.config import ConfigError, register_check
from livr.data.sequence import SEQ_KEYS, _cat_padded, collate


def check_config(cfg, plan=None) -> None:
    """One-line ConfigErrors for packing settings that cannot work (`plan`: the resolved attention kernels, once
    the model is built; a family whose own rules a flex BlockMask cannot carry is refused flex by
    livr.backbones.preflight)."""
    d = cfg.data
    if not d.packing:
        return
    if d.max_tokens <= 0:
        raise ConfigError(f"config: data.max_tokens={d.max_tokens}: packing needs a positive token budget per "
                          "micro-batch (e.g. 16384)")
    kernels = {cfg.model.attn_implementation, cfg.model.attn_implementation_stage2 or cfg.model.attn_implementation}
    if plan is not None:
        kernels |= {plan.stage1, plan.stage2}
    flash = sorted(k for k in kernels if k.startswith("flash"))
    if flash:
        raise ConfigError(f"config: data.packing=true with model.attn_implementation*={flash[0]}: FlashAttention "
                          "takes no 4-D mask, so it cannot keep packed examples apart; use sdpa or flex_attention "
                          "(or auto)")


def plan_packs(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: lists of indices into `lengths`, each list's total <= max_tokens (or one example)."""
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        j = next((j for j, r in enumerate(room) if n <= r), None)
        if j is None:
            packs.append([i])
            room.append(max_tokens - n)
        else:
            packs[j].append(i)
            room[j] -= n
    return [sorted(p) for p in packs]  # examples in their step order inside a pack


def pack_items(items: list[dict]) -> dict:
    """Several encoded examples -> one encoded example of their concatenation (+ `segments`, `seq_lens`)."""
    out: dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key in ("input_ids", "labels", "groups", "position_ids") or key in SEQ_KEYS:
            out[key] = torch.cat(values, dim=-1)  # per token ([L], or [3, L] for mRoPE positions)
        elif torch.is_tensor(values[0]):
            out[key] = _cat_padded(values) if values[0].dim() else torch.stack(values)
        else:
            out[key] = values
    lens = [it["input_ids"].shape[0] for it in items]
    out["segments"] = torch.cat([torch.full((n,), k) for k, n in enumerate(lens)])
    out["seq_lens"] = torch.tensor(lens)
    return out


def collate_packed(items: list[dict], pad_id: int, max_tokens: int) -> list[dict]:
    packs = plan_packs([it["input_ids"].shape[0] for it in items], max_tokens)
    out = []
    for p in packs:
        row = pack_items([items[i] for i in p])
        seq_lens, segments = row.pop("seq_lens"), row.pop("segments")
        batch = collate([row], pad_id)
        batch["segments"], batch["seq_lens"] = segments[None], seq_lens
        out.append(batch)
    return out


def even_packs(micro: list[dict], device) -> list[dict]:
    """Several ranks under DeepSpeed ZeRO: every rank must run as many micro-batches per step (ZeRO-2 reduces the
    gradients of every backward, ZeRO-3 gathers the parameters of every forward: collectives all ranks join), but
    packing gives each rank its own count. The ranks agree on the step's largest count (one all-reduce); a rank with
    fewer packs gets fillers: its smallest pack again, which `train_step` runs with weight 0 (no gradient, not in
    the loss), while the other ranks run their extra packs. (DDP syncs only at each rank's last micro-batch: no
    fillers needed there.)"""
    import torch.distributed as dist

    n = torch.tensor([len(micro)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    smallest = min(micro, key=lambda b: b["input_ids"].numel())
    return [smallest] * (int(n.item()) - len(micro))


def step_rows(micro_batches, accum: int):
    """The micro-batches (index lists) of `livr.data.loader.micro_batches` grouped per optimizer step: this rank's
    rows of each step, in order (the same rows the unpacked step uses)."""
    step: list[int] = []
    for a, mb in enumerate(micro_batches):
        step += mb
        if a % accum == accum - 1:
            yield step
            step = []


register_check("data.packing", check_config)  # data.packing / data.max_tokens, before anything loads
