"""Warm a tiny random backbone up into a small "pretrained" VLM (the demo's stand-in for a real checkpoint).

A random tiny backbone has a vision tower that means nothing, and LoRA on the language model alone learns
pixel tasks on top of it only after thousands of steps (../shared/STACK.md). Real LIVR starts from a
pretrained VLM, so the demo first fully fine-tunes the tiny model (vision tower included, plain causal
mask, no latents) on a mixture of synthetic tasks, then saves it with `save_pretrained` and loads it back
through `from_pretrained` like any checkpoint. `livr backbone make-tiny NAME DIR --warmup-steps N`.
"""
from __future__ import annotations

import json
import os
import random

import torch
from tqdm.auto import tqdm

from livr.backbones import load_backbone
from livr.data.sequence import SequenceBuilder, collate
from livr.data.synthetic import generate_task
from livr.model.build import answer_loss
from livr.training.checkpoint import atomic_dir

STAMP = "livr_warmup.json"


def warm_up(src: str, out_dir: str, *, tasks: list[str], steps: int = 300, batch_size: int = 16, lr: float = 1e-3,
            seed: int = 0, image_size: int = 112, options: dict | None = None, progress: bool = True) -> str:
    """Full fine-tune of `src` on `tasks` for `steps` steps; writes a loadable checkpoint to `out_dir`."""
    request = {"src": os.path.abspath(src), "tasks": list(tasks), "steps": steps, "batch_size": batch_size, "lr": lr,
               "seed": seed, "image_size": image_size, "options": options or {}}
    stamp = os.path.join(out_dir, STAMP)
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == request:
                return out_dir
    torch.manual_seed(seed)
    bb = load_backbone(src)
    builder = SequenceBuilder(bb.tokenizer, bb.processor, bb.family, [], "letter")
    per_task = max(1, steps * batch_size // len(tasks))
    rows = [r for t in tasks for r in generate_task(t, per_task, seed=seed + 1, split="warmup", image_size=image_size,
                                                    **(options or {}))]
    items = [builder.encode(r) for r in tqdm(rows, desc="warm-up data", disable=None if progress else True,
                                                    leave=False)]
    model = bb.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    bar = tqdm(range(steps), desc="warm-up", disable=None if progress else True, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 20))
        batch = collate(rng.sample(items, batch_size), bb.tokenizer.pad_token_id)
        mm = {k: batch[k] for k in bb.family.forward_keys if k in batch}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **mm).logits
        loss = answer_loss(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        bb.tokenizer.save_pretrained(tmp)
        bb.processor.save_pretrained(tmp)
        for name in os.listdir(bb.path):  # keep the preset's own stamp files (family facts, preset info)
            if name.endswith(".json") and not os.path.exists(os.path.join(tmp, name)):
                with open(os.path.join(bb.path, name)) as f, open(os.path.join(tmp, name), "w") as g:
                    g.write(f.read())
        with open(os.path.join(tmp, STAMP), "w") as f:
            json.dump(request, f)
    return out_dir
