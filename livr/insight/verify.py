"""`livr verify`: prove the Stage-1 visual bottleneck empirically on the configured backbone.

On a few real examples (synthetic rows, or the configured loader's val split) it measures, with the mask
that Stage 1 trains under (`mask_fn(groups, dtype) -> additive [B,1,L,L]` or a dict of them per layer type; default the family's `stage1_mask`):

(a) latents cut (LATENT relabelled PROMPT, so they are image-blind too): the answer logits and the prompt
    hidden states (every layer) do not change when the pixels change — the maximum difference must be 0;
(b) with the latents: the answer logits do change with the pixels (max difference > 0);
(c) no logit that predicts an answer token is computed at a latent or image position, and the mask
    blocks every such row from every image column;
(d) the gradient of the answer loss w.r.t. pixel_values is exactly zero with the latents cut and
    non-zero with them.

The pixels change in two ways: the images swapped for another example's (resized to the same layout) and
pixel_values perturbed with Gaussian noise. `verify` returns one `Check` per property; the CLI prints
PASS/FAIL with the measured maximum and exits non-zero on any FAIL.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from livr.config import Config
from livr.data.sequence import collate, images_of
from livr.method.groups import GROUP_NAMES, IMAGE, LATENT, PROMPT
from livr.method.mask import additive
from livr.model import flex
from livr.model.build import build_model

MaskFn = Callable[[torch.Tensor, torch.dtype], torch.Tensor]


@dataclass
class Check:
    name: str
    passed: bool
    value: float  # the measured maximum (difference, gradient, or count of offending positions)
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<47} max = {self.value:.3e}  {self.detail}"


def sample_rows(cfg: Config, n: int = 3) -> list[dict]:
    """A handful of real rows: synthetic ones from the configured generator, else the loader's val split."""
    task = cfg.data.tasks[0]
    if cfg.data.source == "synthetic":
        from livr.data.synthetic import _opts_per_task, generate_task

        opts = _opts_per_task([task], cfg.data.options)[task]
        return generate_task(task, n, seed=cfg.data.seed + 7, split="val", image_size=cfg.data.image_size, **opts)
    from livr.data.blink import load_blink

    return list(load_blink(task, cfg.data.val_split, cfg.data.source, limit=n))


def swapped_pair(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(a, b) pairs with identical text whose images differ: b carries another row's images resized to a's sizes."""
    pairs = []
    for i in range(len(rows) - 1):
        a, b = dict(rows[i]), dict(rows[i])
        for k in ("image_1", "image_2", "image_3", "image_4"):
            if a.get(k) is not None and rows[i + 1].get(k) is not None:
                b[k] = rows[i + 1][k].convert("RGB").resize(a[k].size)
        if len(images_of(b)) == len(images_of(a)):
            pairs.append((a, b))
    return pairs


def _inputs(lm, batch: dict, groups: torch.Tensor, mask_fn: MaskFn) -> dict:
    inputs = lm.model_inputs({**batch, "groups": groups}, bottleneck=True)  # explicit positions, mm tensors
    inputs["attention_mask"] = mask_fn(groups.to(lm.device), lm.dtype)
    return inputs


def answer_rows(batch: dict) -> torch.Tensor:
    """[B, L] bool: positions whose logits predict a labelled (answer) token."""
    rows = torch.zeros_like(batch["labels"], dtype=torch.bool)
    rows[:, :-1] = batch["labels"][:, 1:] != -100
    return rows


def cut_latents(groups: torch.Tensor) -> torch.Tensor:
    return torch.where(groups == LATENT, PROMPT, groups)


@torch.no_grad()
def _diffs(lm, a: dict, b: dict, groups: torch.Tensor, mask_fn: MaskFn) -> tuple[float, float]:
    """(max |Δ answer logits|, max |Δ prompt hidden states| over layers) between batches a and b."""
    keep = answer_rows(a).to(lm.device)  # the LM head only where a logit predicts an answer token
    prompt = (groups[0] == PROMPT).to(lm.device)
    oa = lm.model(**_inputs(lm, a, groups, mask_fn), output_hidden_states=True, logits_to_keep=keep, use_cache=False)
    ob = lm.model(**_inputs(lm, b, groups, mask_fn), output_hidden_states=True, logits_to_keep=keep, use_cache=False)
    logit = (oa.logits - ob.logits).abs().max().item()
    hidden = max((ha[0, prompt] - hb[0, prompt]).abs().max().item() for ha, hb in zip(oa.hidden_states, ob.hidden_states))
    return logit, hidden


def _pixel_grad(lm, batch: dict, groups: torch.Tensor, mask_fn: MaskFn) -> float:
    px = batch["pixel_values"].to(lm.device, lm.dtype).clone().requires_grad_(True)
    inputs = {**_inputs(lm, batch, groups, mask_fn), "pixel_values": px}
    keep = answer_rows(batch).to(lm.device)
    logits = lm.model(**inputs, logits_to_keep=keep, use_cache=False).logits
    targets = batch["labels"][:, 1:].to(lm.device)[keep[:, :-1]]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)
    (g,) = torch.autograd.grad(loss, px, allow_unused=True)
    return 0.0 if g is None else g.abs().max().item()


def _perturbed(batch: dict, seed: int) -> dict:
    px = batch["pixel_values"]
    gen = torch.Generator().manual_seed(seed)
    return {**batch, "pixel_values": px + 0.5 * torch.randn(px.shape, generator=gen, dtype=px.dtype)}


def verify(cfg: Config, mask_fn: MaskFn | None = None, *, num_rows: int = 3, lm=None) -> list[Check]:
    """The four bottleneck properties on `cfg`'s backbone (K forced to >= 1); one Check each."""
    if lm is None:
        cfg = copy.deepcopy(cfg)
        cfg.latents.num_latents = cfg.latents.num_latents or 4  # (b) and (d) need latents
        cfg.model.cache_vision = False  # (c) and (d) need the live vision path (pixels perturbed, their gradient)
        torch.manual_seed(cfg.train.seed)
        lm = build_model(cfg, trainable=False)
    lm.model.eval()
    mask_fn = mask_fn or (lambda g, d: lm.stage1_mask(g))  # the mask Stage 1 trains under
    via_sdpa = []

    def grad_mask_fn(g, d):  # no flex_attention backward on a CPU: (d) runs the same mask, as an additive one
        m = mask_fn(g, d)
        if flex.is_block_mask(m) and lm.device.type == "cpu":
            via_sdpa.append(1)
            return additive(flex.allowed(m)[:, 0], d)
        return m

    pad = lm.tokenizer.pad_token_id
    pairs = swapped_pair(sample_rows(cfg, num_rows))
    if not pairs:
        raise ValueError("verify: need two rows with the same number of images")
    cut_logit = cut_hidden = with_logit = 0.0
    offending = leaking = n_answer = 0
    grad_cut = grad_with = 0.0
    pixels_differ = True
    for i, (ra, rb) in enumerate(pairs):
        a = collate([lm.builder.encode(ra)], pad)
        variants = [collate([lm.builder.encode(rb)], pad), _perturbed(a, i)]
        pixels_differ &= all(not torch.equal(a["pixel_values"], v["pixel_values"]) for v in variants)
        for b in variants:
            if b["input_ids"].shape != a["input_ids"].shape or not torch.equal(b["input_ids"], a["input_ids"]):
                continue  # a different layout: not a pixels-only change
            lo, hi = _diffs(lm, a, b, cut_latents(a["groups"]), mask_fn)
            cut_logit, cut_hidden = max(cut_logit, lo), max(cut_hidden, hi)
            with_logit = max(with_logit, _diffs(lm, a, b, a["groups"], mask_fn)[0])
        rows = answer_rows(a)[0]
        n_answer += int(rows.sum())
        offending += int(torch.isin(a["groups"][0, rows], torch.tensor([LATENT, IMAGE])).sum())
        masks = mask_fn(a["groups"].to(lm.device), lm.dtype)  # additive: 0 = attend; a dict per layer type
        if flex.is_block_mask(masks):
            allowed = flex.allowed(masks)[0, 0]
        else:
            allowed = torch.stack([m[0, 0] == 0 for m in (masks.values() if isinstance(masks, dict) else [masks])]).any(0)
        image_cols = (a["groups"][0] == IMAGE).to(lm.device)
        leaking += int(allowed[rows.to(lm.device)][:, image_cols].any(-1).sum())
        grad_cut = max(grad_cut, _pixel_grad(lm, a, cut_latents(a["groups"]), grad_mask_fn))
        grad_with = max(grad_with, _pixel_grad(lm, a, a["groups"], grad_mask_fn))
    where = f"{len(pairs)} pair(s), swapped + perturbed pixels"
    diff_ok = "" if pixels_differ else " (pixel_values did not change: vacuous)"
    return [
        Check("(a) latents cut: answer/prompt pixel-invariant", cut_logit == 0 and cut_hidden == 0 and pixels_differ,
              max(cut_logit, cut_hidden), f"logits {cut_logit:.3e}, prompt hidden {cut_hidden:.3e}; {where}{diff_ok}"),
        Check("(b) with latents: answer depends on pixels", with_logit > 0 and pixels_differ, with_logit,
              f"answer logits; {where}{diff_ok}"),
        Check("(c) answer logits at image-blind positions", offending == 0 and leaking == 0, float(offending + leaking),
              f"{n_answer} answer-predicting rows: {offending} at latent/image positions, "
              f"{leaking} allowed to see an image column (groups of those rows: "
              f"{sorted(set(_group_names(a['groups'][0, rows])))})"),
        Check("(d) d(answer loss)/d(pixels): 0 cut, >0 with", grad_cut == 0 and grad_with > 0, grad_cut,
              f"max |grad| cut {grad_cut:.3e}, with latents {grad_with:.3e}"
              + ("; the same mask via SDPA (no flex_attention backward on CPU)" if via_sdpa else "")),
    ]


def _group_names(groups: torch.Tensor) -> list[str]:
    return [GROUP_NAMES[int(g)] for g in groups]


def run_verify(cfg: Config, mask_fn: MaskFn | None = None) -> int:
    """Print the checks; 0 when all pass, 1 otherwise (the CLI's exit code)."""
    checks = verify(cfg, mask_fn)
    print(f"livr verify: backbone {cfg.model.backbone}, attention {cfg.model.attn_implementation}, "
          f"data {cfg.data.source}:{cfg.data.tasks[0]}")
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.passed]
    print("all bottleneck properties hold" if not failed else f"{len(failed)} check(s) FAILED")
    return 1 if failed else 0


__all__ = ["Check", "run_verify", "verify"]
