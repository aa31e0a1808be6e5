"""Evaluation: greedy generation with the latents inserted and a KV cache, BLINK scoring, Table 1.

The prompt (chat template + images + latents + delimiter) is encoded by the same SequenceBuilder as
training; the prefix runs once, then one token per step reuses the cache. With `bottleneck=True` the
Stage-1 mask is applied to the prefix and to every generated (answer) token.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from livr.data.prompts import is_correct
from livr.data.tasks import PAPER_TASKS
from livr.mask import bottleneck_mask
from livr.sequence import ANSWER, collate

TASK_SHORT = {"Counting": "Count", "Jigsaw": "Jigsaw", "Object_Localization": "Loc", "Visual_Correspondence": "VisCorr",
              "Art_Style": "Art", "Semantic_Correspondence": "SemCorr", "Functional_Correspondence": "FuncCorr",
              "Relative_Reflectance": "Refl", "Visual_Similarity": "Sim"}


@torch.no_grad()
def generate(lm, items: list[dict], *, bottleneck: bool = False, max_new_tokens: int = 8, sync: bool = False) -> list[str]:
    """Greedy decoding for encoded prompts (`encode(row, with_answer=False)`), left-padded, KV-cached.
    `sync`: keep decoding until every rank is done (ZeRO-3 forwards are collectives)."""
    model, fam = lm.model, lm.family
    batch = {k: v.to(lm.device) for k, v in collate(items, lm.tokenizer.pad_token_id, "left").items()}
    ids, attn, groups = batch["input_ids"], batch["attention_mask"], batch["groups"]
    mm = {k: batch[k] for k in fam.forward_keys if k in batch}
    if "pixel_values" in mm:
        mm["pixel_values"] = mm["pixel_values"].to(lm.dtype)
    pos = batch["position_ids"] if "position_ids" in batch else fam.position_ids(model, ids, attn, mm)
    mask = bottleneck_mask(groups, lm.dtype) if bottleneck else attn
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **mm)
    eos = lm.tokenizer.convert_tokens_to_ids(fam.end_of_turn)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=lm.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        new_tokens.append(nxt)
        done |= nxt == eos
        if _all_done(done, sync):
            break
        groups = torch.cat([groups, torch.full_like(groups[:, :1], ANSWER)], 1)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        pos = fam.next_position_ids(pos)
        step_mask = bottleneck_mask(groups, lm.dtype)[:, :, -1:] if bottleneck else attn
        step = {k: torch.zeros_like(v[:, :1]) for k, v in mm.items() if k in ("mm_token_type_ids", "token_type_ids")}
        out = model(input_ids=nxt[:, None], attention_mask=step_mask, position_ids=pos,
                    cache=out.cache, use_cache=True, **step)
    tokens = torch.stack(new_tokens, 1).tolist()
    return [lm.tokenizer.decode([t for t in row if t != eos], skip_special_tokens=True) for row in tokens]


def _all_done(done: torch.Tensor, sync: bool) -> bool:
    if not sync:
        return bool(done.all())
    left = torch.tensor([float((~done).sum())])
    dist.all_reduce(left)
    return left.item() == 0


def evaluate_rows(lm, rows: list[dict], *, bottleneck: bool = False, batch_size: int = 8, max_new_tokens: int = 8,
                  rank: int = 0, world: int = 1, quiet: bool = True) -> dict:
    """Per-task accuracy on `rows` (sharded over ranks, summed across them) and rank 0's predictions."""
    was_training = lm.model.training
    lm.model.eval()
    mine = list(range(rank, len(rows), world))
    sync = world > 1  # every rank runs the same number of batches and decode steps
    n_batches = -(-len(range(0, len(rows), world)) // batch_size) if sync else -(-len(mine) // batch_size)
    correct, total, preds = defaultdict(int), defaultdict(int), []
    for b in tqdm(range(n_batches), desc="evaluate", disable=quiet, leave=False):
        chunk = [rows[i] for i in mine[b * batch_size : (b + 1) * batch_size]]
        scored = len(chunk)
        chunk = chunk or [rows[0]]  # a rank out of rows runs a dummy batch to keep collectives in step
        outs = generate(lm, [lm.builder.encode(r, with_answer=False) for r in chunk],
                        bottleneck=bottleneck, max_new_tokens=max_new_tokens, sync=sync)
        for r, o in zip(chunk[:scored], outs[:scored]):
            ok = is_correct(o, r)
            correct[r["sub_task"]] += int(ok)
            total[r["sub_task"]] += 1
            preds.append({"idx": r["idx"], "task": r["sub_task"], "output": o, "answer": r["answer"], "correct": ok})
    tasks = sorted({r["sub_task"] for r in rows})
    if world > 1:
        t = torch.tensor([[correct[k], total[k]] for k in tasks], dtype=torch.float64)
        dist.all_reduce(t)
        correct = {k: t[i, 0].item() for i, k in enumerate(tasks)}
        total = {k: t[i, 1].item() for i, k in enumerate(tasks)}
    acc = {k: correct[k] / total[k] for k in tasks if total[k]}
    if was_training:
        lm.model.train()
    return {"accuracy": acc, "mean": sum(acc.values()) / max(1, len(acc)), "n": {k: int(total[k]) for k in tasks},
            "predictions": preds}


def write_eval(path: str, results: dict, meta: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"results": results, **(meta or {})}, f, indent=1)
    os.replace(tmp, path)


def table1(rows: list[tuple[str, dict[str, float]]], tasks: list[str] | None = None) -> str:
    """The paper's Table-1 layout (markdown): one row per method, task columns + mean, accuracy in %."""
    present = {t for _, acc in rows for t in acc}
    tasks = tasks or [t for t in PAPER_TASKS if t in present] + sorted(present - set(PAPER_TASKS))
    head = "| method | " + " | ".join(TASK_SHORT.get(t, t) for t in tasks) + " | mean |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for name, acc in rows:
        cells = [f"{100 * acc[t]:.2f}" if t in acc else "–" for t in tasks]
        vals = [acc[t] for t in tasks if t in acc]
        mean = f"{100 * sum(vals) / len(vals):.2f}" if vals else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def run_rows(run_dirs: list[str], split: str = "test") -> list[tuple[str, dict[str, float]]]:
    """Rows for `table1` from run directories: zero-shot (when recorded), then each run by its mode."""
    rows = []
    for d in run_dirs:
        zs = os.path.join(d, "eval_zero_shot.json")
        if os.path.exists(zs) and not any(r[0] == "zero-shot" for r in rows):
            with open(zs) as f:
                rows.insert(0, ("zero-shot", json.load(f)["results"][split]["accuracy"]))
        with open(os.path.join(d, "eval.json")) as f:
            ev = json.load(f)
        label = "SFT" if ev.get("mode") == "sft" else f"LIVR (K={ev.get('num_latents')})"
        rows.append((label, ev["results"][split]["accuracy"]))
    return rows
