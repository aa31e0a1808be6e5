"""Causal tests of a trained run's latents: do they carry the answer? (measurement; `causal_report.py` runs them).

Every figure is per example (or per pair of examples), so that `causal_report` can put a bootstrap confidence
interval on it. Answers are read by forced choice: the prediction is the candidate answer (the choice letters,
or the numbers 0..max for open-ended counting) whose first token has the highest logit at the position that
predicts the first answer token; the answer log-probability is the teacher-forced log-probability of the gold
answer tokens (end-of-turn included). No decoding, so interventions on input embeddings and hidden states are
exact and cheap.

- `score`: accuracy and answer log-probability under an intervention on the latents, under the run's normal
  (causal) mask or the Stage-1 mask. Interventions: `remove` (no latents and no delimiter: the K = 0 sequence),
  `markers_only` (only the delimiter `<livr_latent_end>` kept), `mean` (every latent's input embedding replaced
  by the mean latent row), `random` (random rows with each latent row's norm, seeded), `repeat` (latent 0's
  row at all K positions).
- `patch_flips`: activation patching: example B run with its latent (or image-token) hidden states replaced, at
  the chosen decoder layers, by those of donor example A; does B's answer become A's answer?
- `states`: per-layer hidden states of the latents (and of the last prompt token, a reference) for the
  sensitivity, collapse and probe analyses.
"""
from __future__ import annotations

import contextlib
import copy
import re

import torch

from livr.data.prompts import answer_letter, choice_letters
from livr.data.sequence import collate, images_of
from livr.insight.inspect import without_latents
from livr.method.groups import IGNORE, IMAGE, LATENT, PROMPT

INTERVENTIONS = ("none", "remove", "markers_only", "mean", "random", "repeat")
EMBEDDING_INTERVENTIONS = ("mean", "random", "repeat")
OPEN_MAX = 20  # open-ended counting: candidates 0..max(OPEN_MAX, gold)


# ----------------------------------------------------------------------------- sequences and answers
def no_latents(builder):
    """The run's SequenceBuilder with neither latents nor delimiter: the K = 0 sequence."""
    b = copy.copy(builder)
    b.latent_ids, b.latent_text = [], ""
    return b


def builder_for(lm, intervention: str):
    if intervention == "remove":
        return no_latents(lm.builder)
    if intervention == "markers_only":
        return without_latents(lm.builder)
    return lm.builder


def candidates(lm, row: dict) -> tuple[list[int], int]:
    """(first token id of every candidate answer, the gold answer's first token id)."""
    b = lm.builder
    gold = b.answer_ids(row)[0]
    if answer_letter(row) is not None:
        texts = [f"({c})" for c in choice_letters(len(row["choices"]))]
    else:
        texts = [str(i) for i in range(max(OPEN_MAX, int(str(row["answer"]).strip())) + 1)]
    first = list(dict.fromkeys(b.answer_ids({**row, "answer": t})[0] for t in texts))
    return first, gold


def num_choices(row: dict) -> int:
    return len(row["choices"]) if answer_letter(row) is not None else 0


def latent_positions(lm, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the K latent tokens (not the delimiter)."""
    return torch.isin(input_ids, torch.tensor(lm.latent_ids[:-1], device=input_ids.device))


# ----------------------------------------------------------------------------- hooks
@contextlib.contextmanager
def hooked(module, hook):
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def latent_rows(lm) -> torch.Tensor:
    """[K, H]: the input embeddings of the K latents, as the model's embedding module outputs them (scaling and
    all)."""
    emb = lm.model.get_input_embeddings()
    with torch.no_grad():
        return emb(torch.tensor(lm.latent_ids[:-1], device=lm.device)).detach()


def replacement_rows(lm, intervention: str, seed: int) -> torch.Tensor:
    """[K, H] rows that replace the latents' input embeddings."""
    rows = latent_rows(lm)
    if intervention == "mean":
        return rows.mean(0, keepdim=True).expand_as(rows).clone()
    if intervention == "repeat":
        return rows[:1].expand_as(rows).clone()
    if intervention == "random":
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(rows.shape, generator=g).to(rows)
        return r / r.norm(dim=-1, keepdim=True) * rows.norm(dim=-1, keepdim=True)
    raise ValueError(f"not an embedding intervention: {intervention!r}")


def embedding_hook(lm, rows: torch.Tensor):
    """Forward hook on the input embedding: the K latent positions (in order) get `rows`."""
    def hook(module, args, out):
        ids = args[0]
        where = latent_positions(lm, ids)
        if not where.any():
            return out
        out = out.clone()
        for b in range(ids.shape[0]):
            pos = where[b].nonzero().flatten()
            out[b, pos] = rows[: len(pos)].to(out.dtype)
        return out
    return hook


def decoder_layers(lm) -> torch.nn.ModuleList:
    return next(m for n, m in lm.model.named_modules() if re.fullmatch(r"(.*\.)?language_model\.layers", n))


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(out, h):
    return (h, *out[1:]) if isinstance(out, tuple) else h


@contextlib.contextmanager
def patched_layers(lm, positions: torch.Tensor, donor: list[torch.Tensor], layers: list[int]):
    """Decoder layers `layers` output `donor[layer]` ([n, H]) at `positions` (of batch row 0)."""
    handles = []
    mods = decoder_layers(lm)

    def make(layer):
        def hook(module, args, out):
            h = _hidden(out).clone()
            h[0, positions] = donor[layer].to(h.dtype)
            return _with_hidden(out, h)
        return hook

    try:
        for layer in layers:
            handles.append(mods[layer].register_forward_hook(make(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def answer_logits(lm, inputs: dict, batch: dict) -> torch.Tensor:
    """[n, V]: the logits at the n positions that predict the gold answer's tokens, the LM head applied only there
    (as `answer_nll` in training: the [L, V] logits of a 4k-token sequence with a 150k vocabulary are never built)."""
    labels = batch["labels"].to(lm.device)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    logits = lm.model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return logits.reshape(-1, logits.shape[-1])


def layer_outputs(lm, inputs: dict, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per decoder layer, its output hidden states [L, H] for batch row 0; the answer logits), one forward."""
    outs = []
    mods = decoder_layers(lm)
    handles = [m.register_forward_hook(lambda mod, a, o: outs.append(_hidden(o)[0].detach())) for m in mods]
    try:
        logits = answer_logits(lm, inputs, batch)
    finally:
        for h in handles:
            h.remove()
    return outs, logits


# ----------------------------------------------------------------------------- scoring one forward
def read_answer(lm, batch: dict, logits: torch.Tensor, row: dict) -> dict:
    """Forced-choice prediction and gold-answer log-probability from `answer_logits` [n, V] of one example."""
    labels = batch["labels"][0].to(logits.device)
    targets = labels[1:][labels[1:] != IGNORE]  # logits row j predicts the j-th labelled token
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).sum()
    cands, gold = candidates(lm, row)
    first = logits[0].float()
    pred = cands[int(first[torch.tensor(cands, device=first.device)].argmax())]
    return {"correct": pred == gold, "logp": float(logp), "pred": pred, "gold": gold}


def encode(lm, row: dict, builder=None) -> dict:
    return collate([(builder or lm.builder).encode(row)], lm.tokenizer.pad_token_id)


@torch.no_grad()
def score(lm, rows: list[dict], intervention: str, bottleneck: bool, seed: int = 0) -> list[dict]:
    """Per row: forced-choice correctness and the gold answer's log-probability under `intervention`."""
    lm.model.eval()
    builder = builder_for(lm, intervention)
    ctx = (hooked(lm.model.get_input_embeddings(), embedding_hook(lm, replacement_rows(lm, intervention, seed)))
           if intervention in EMBEDDING_INTERVENTIONS else contextlib.nullcontext())
    out = []
    with ctx:
        for row in rows:
            batch = encode(lm, row, builder)
            out.append(read_answer(lm, batch, answer_logits(lm, lm.model_inputs(batch, bottleneck), batch), row))
    return out


# ----------------------------------------------------------------------------- activation patching
def swap_images(row: dict, other: dict) -> dict:
    """`row` with `other`'s images, each resized to the size of the one it replaces (same token counts)."""
    out = dict(row)
    for i, (slot, img) in enumerate(zip([f"image_{j}" for j in range(1, 5)], images_of(row))):
        src = images_of(other)
        out[slot] = src[i % len(src)].convert("RGB").resize(img.size)
    return out


def donor_pairs(rows: list[dict], seed: int) -> list[tuple[int, int]]:
    """(donor A, recipient B) index pairs: for each B, a random A of the same task and number of choices whose
    gold answer differs (B without such an A is left out)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for b, rb in enumerate(rows):
        pool = [a for a, ra in enumerate(rows) if a != b and ra.get("sub_task") == rb.get("sub_task")
                and num_choices(ra) == num_choices(rb) and str(ra["answer"]) != str(rb["answer"])]
        if pool:
            pairs.append((pool[int(torch.randint(len(pool), (1,), generator=g))], b))
    return pairs


@torch.no_grad()
def patch_flips(lm, rows: list[dict], pairs: list[tuple[int, int]], *, what: str, bottleneck: bool,
                layers: list[int] | None = None) -> list[dict]:
    """Per pair (A, B): B run with A's `what` ("latent" or "image") hidden states at `layers` (default all).
    `flip`: B's forced-choice answer is A's gold answer; `before`: it already was, unpatched (the no-effect
    level of `flip`); `to_donor`: B's answer is A's own (unpatched) prediction; `changed`: B's answer moved;
    `chance`: 1 / number of choices. A pair whose `what` token counts differ (other image sizes) is skipped."""
    lm.model.eval()
    group = LATENT if what == "latent" else IMAGE
    layers = list(range(len(decoder_layers(lm)))) if layers is None else layers
    answers, donors = {}, {}  # index -> unpatched answer; -> latent states per layer (image states: recomputed)

    def forward(i):
        """(batch, per-layer states at the `what` positions, those positions) of row i, its answer recorded."""
        batch = encode(lm, rows[i])
        hs, logits = layer_outputs(lm, lm.model_inputs(batch, bottleneck), batch)
        pos = (batch["groups"][0] == group).nonzero().flatten()
        answers[i] = read_answer(lm, batch, logits, rows[i])
        return batch, [h[pos] for h in hs], pos

    out = []
    for a, b in pairs:
        if a in donors:
            donor = donors[a]
        else:
            _, donor, _ = forward(a)
            if what == "latent":  # small (K x H per layer): kept; image states are large
                donors[a] = donor
        if b in answers:
            batch_b = encode(lm, rows[b])
            pos_b = (batch_b["groups"][0] == group).nonzero().flatten()
        else:
            batch_b, _, pos_b = forward(b)
        if len(donor[0]) != len(pos_b) or len(pos_b) == 0:
            continue
        with patched_layers(lm, pos_b.to(lm.device), donor, layers):
            got = read_answer(lm, batch_b, answer_logits(lm, lm.model_inputs(batch_b, bottleneck), batch_b), rows[b])
        ans_a, ans_b = answers[a], answers[b]
        out.append({"flip": got["pred"] == ans_a["gold"], "before": ans_b["pred"] == ans_a["gold"],
                    "to_donor": got["pred"] == ans_a["pred"], "changed": got["pred"] != ans_b["pred"],
                    "chance": 1.0 / max(num_choices(rows[b]), 1)})
    return out


# ----------------------------------------------------------------------------- hidden states per layer
@torch.no_grad()
def states(lm, row: dict, bottleneck: bool) -> dict:
    """{"latent": [layers+1, K, H], "prompt": [layers+1, H]} (layer 0 = the input embeddings): the latents' hidden
    states and the last prompt token's (the token before the first latent, or before the answer when K = 0)."""
    lm.model.eval()
    batch = encode(lm, row)
    groups = batch["groups"][0]
    lat = (groups == LATENT).nonzero().flatten()
    last_prompt = (groups == PROMPT).nonzero().flatten()[-1:]
    out = lm.model(**lm.model_inputs(batch, bottleneck), output_hidden_states=True, logits_to_keep=1, use_cache=False)
    keep = torch.cat([lat, last_prompt]).to(lm.device)  # only these leave the device, not [layers+1, L, H]
    hs = torch.stack([h[0, keep].float() for h in out.hidden_states]).cpu()
    return {"latent": hs[:, : len(lat)], "prompt": hs[:, -1]}
