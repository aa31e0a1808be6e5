"""K latent tokens: new rows of the embedding table, the only embedding rows that train.

The tokens are `<livr_latent_0>` … `<livr_latent_{K-1}>` plus one delimiter `<livr_latent_end>` that
separates the latents from the answer (LIVR_SPEC §1: without it the first answer token would be
predicted at a latent position, which sees the image). All K+1 rows are trainable; every other row of
the embedding table (and of a tied or untied output head) stays bit-identical.
"""
from __future__ import annotations

import contextlib

import torch

LATENT_END = "<livr_latent_end>"


def latent_tokens(k: int) -> list[str]:
    """The token strings for K latents and, when K > 0, the delimiter."""
    return [f"<livr_latent_{i}>" for i in range(k)] + ([LATENT_END] if k > 0 else [])


def add_latent_tokens(model, tokenizer, k: int, *, init: str = "random", seed: int = 0, whole=None) -> list[int]:
    """Add K latent tokens (+ delimiter) to `tokenizer` and `model`; return their ids (latents, then end).

    `whole(weight)`: a context in which a partitioned table is whole for the write (ZeRO-3: DeepSpeed's
    GatheredParameters, handed in by `livr.model.build`); by default the table is already whole.

    Deterministic: the same (base, K, init, seed) always gives the same new rows, so a run reloads onto
    a freshly resized base exactly. The embedding only grows (real checkpoints often carry padded,
    unused rows beyond len(tokenizer); those are reused rather than cut off).
    """
    tokens = latent_tokens(k)
    if not tokens:
        return []
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    weight = model.get_input_embeddings().weight
    old_rows = getattr(weight, "ds_shape", weight.shape)[0]  # a ZeRO-3 partition's own shape is empty
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    table = model.get_input_embeddings().weight
    whole = whole or (lambda w: contextlib.nullcontext())
    _init_rows(table, ids, init, gen, whole)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not table:
        _init_rows(head.weight, ids, init, gen, whole)  # untied head: deterministic, never trained
    return ids


def _init_rows(weight: torch.Tensor, ids: list[int], init: str, gen, whole) -> None:
    with whole(weight), torch.no_grad():
        _fill_rows(weight, ids, init, gen)


def _fill_rows(weight: torch.Tensor, ids: list[int], init: str, gen) -> None:
    base = weight[: min(ids)].float()  # the base vocabulary's rows
    if init == "mean":
        rows = base.mean(0, keepdim=True).expand(len(ids), -1)
    else:
        std = base.std().item()
        rows = torch.randn(len(ids), weight.shape[1], generator=gen) * std
    weight[ids] = rows.to(weight.dtype).to(weight.device)


def latent_ids_of(tokenizer) -> list[int]:
    """The latent (+ end) ids already in a tokenizer, in order (for a reloaded run)."""
    vocab = tokenizer.get_vocab()
    k = 0
    while f"<livr_latent_{k}>" in vocab:
        k += 1
    return [vocab[t] for t in latent_tokens(k)]
