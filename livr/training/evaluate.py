"""Evaluation: greedy generation with the latents inserted and a KV cache, BLINK scoring, Table 1,
BLINK test-split submission files.

The prompt (chat template + images + latents + delimiter) is encoded by the same SequenceBuilder as
training; the prefix runs once, then one token per step reuses the cache. With `bottleneck=True` the
Stage-1 mask is applied to the prefix and to every generated (answer) token.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from livr.data.blink import HIDDEN_ANSWER
from livr.data.lengths import grouped_batches, prompt_lengths
from livr.data.loader import EncodedRows, checked, column, make_loader
from livr.data.prompts import FAILED, PARSERS, is_correct, predicted
from livr.data.sequence import collate
from livr.data.tasks import PAPER_TASKS, DataError
from livr.method.groups import ANSWER

TASK_SHORT = {"Counting": "Count", "Jigsaw": "Jigsaw", "Object_Localization": "Loc", "Visual_Correspondence": "VisCorr",
              "Art_Style": "Art", "Semantic_Correspondence": "SemCorr", "Functional_Correspondence": "FuncCorr",
              "Relative_Reflectance": "Refl", "Visual_Similarity": "Sim"}


@torch.no_grad()
def generate(lm, items: list[dict] | dict, *, bottleneck: bool = False, max_new_tokens: int = 8, sync: bool = False) -> list[str]:
    """Greedy decoding for encoded prompts (`encode(row, with_answer=False)`, or a batch of them collated with
    left padding), KV-cached. `sync`: keep decoding until every rank is done (ZeRO-3 forwards are collectives)."""
    model, fam = lm.model, lm.family
    batch = items if isinstance(items, dict) else collate(items, lm.tokenizer.pad_token_id, "left")
    batch = {k: v.to(lm.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    ids, attn, groups = batch["input_ids"], batch["attention_mask"], batch["groups"]
    mm = lm.mm_inputs(batch)
    pos = batch["position_ids"] if "position_ids" in batch else fam.position_ids(model, ids, attn, mm)
    mask = fam.stage1_mask(model, groups, lm.dtype) if bottleneck else attn
    # the LM head at the last position only: [B, 1, V], never [B, L, V] (10 GB of bf16 at B 8, L 4200, V 152k)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **mm)
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
        step_mask = fam.stage1_mask(model, groups, lm.dtype, rows=1) if bottleneck else attn
        step = {k: torch.zeros_like(v[:, :1]) for k, v in mm.items() if k in ("mm_token_type_ids", "token_type_ids")}
        out = model(input_ids=nxt[:, None], attention_mask=step_mask, position_ids=pos,
                    cache=out.cache, use_cache=True, **step)
    tokens = torch.stack(new_tokens, 1).tolist()
    return [lm.tokenizer.decode([t for t in row if t != eos], skip_special_tokens=True) for row in tokens]


def _all_done(done: torch.Tensor, sync: bool) -> bool:
    if not sync:
        return bool(done.all())
    left = (~done).sum().to(torch.float64).reshape(1)  # on the decode device: NCCL groups reduce CUDA tensors only
    dist.all_reduce(left)
    return left.item() == 0


def hidden_answers(rows, split: str = "") -> bool:
    """True when every row's answer is BLINK's "hidden" (the test split), False when none is; a split that
    mixes both is a DataError (its accuracy would silently cover only part of it). Reads text columns only."""
    answers, tasks, idxs = column(rows, "answer"), column(rows, "sub_task"), column(rows, "idx")
    hidden = [a == HIDDEN_ANSWER for a in answers]
    if not any(hidden) or all(hidden):
        return bool(hidden) and all(hidden)
    i = hidden.index(not hidden[0])
    raise DataError(f"{split or 'split'}: task {tasks[i]} idx={idxs[i]} has answer {answers[i]!r} but task "
                    f"{tasks[0]} idx={idxs[0]} has {answers[0]!r}: a split's answers must be all hidden (BLINK test) "
                    "or all public")


def evaluate_rows(lm, rows, *, bottleneck: bool = False, batch_size: int = 8, max_new_tokens: int = 8,
                  rank: int = 0, world: int = 1, quiet: bool = True, parser: str = "blink", split: str = "",
                  num_workers: int = 0, data: tuple | None = None, group_by_length: bool = True) -> dict:
    """Per-task accuracy on `rows` (sharded over ranks, summed across them) and every row's prediction.

    "accuracy" (task -> fraction) and "mean" use `parser`; "accuracy_by_parser" holds every parser's per-task
    accuracy (blink, lenient, match: BLINK's fixed rule and the judge-free matcher side by side). "predictions" lists every row once, in the order of `rows` (gathered from all ranks), with the
    raw "output" and the parsed "prediction" ("(X)", a number, or None). When every answer is hidden
    (BLINK's test split) the outputs are generated and parsed as usual but the accuracies are None.
    Rows are encoded batch by batch (in `num_workers` loader processes), never the whole split at once;
    `data`: an `eval_loader(...)` kept between evaluations (its workers and encoded rows persist)."""
    if parser not in PARSERS:
        raise DataError(f"eval.parser must be one of {', '.join(PARSERS)}, got {parser!r}")
    hidden = hidden_answers(rows, split)
    was_training = lm.model.training
    lm.model.eval()
    sync = world > 1  # every rank runs the same number of batches and decode steps
    loader, batches, scored = data or eval_loader(lm, rows, batch_size, rank, world, num_workers,
                                                    group_by_length=group_by_length, split=split)
    n_batches = len(batches)
    correct = {p: defaultdict(int) for p in PARSERS}
    total, preds = defaultdict(int), []
    for b, batch in enumerate(tqdm(loader, total=n_batches, desc="evaluate",
                                         disable=True if quiet else None, leave=False)):
        checked(batch)
        with lm.bottleneck_attention() if bottleneck else contextlib.nullcontext():  # a kernel that takes the mask
            outs = generate(lm, batch, bottleneck=bottleneck, max_new_tokens=max_new_tokens, sync=sync)
        for i, r, o in zip(batches[b][: scored[b]], batch["meta"], outs):
            ok = None
            if not hidden:
                for p in PARSERS:
                    correct[p][r["sub_task"]] += int(is_correct(o, r, p))
                ok = is_correct(o, r, parser)
            total[r["sub_task"]] += 1
            preds.append({"row": i, "idx": r["idx"], "task": r["sub_task"], "output": o,
                          "prediction": predicted(o, r, parser), "answer": r["answer"], "correct": ok})
    tasks = sorted(set(column(rows, "sub_task")))
    counts = {k: [correct[p][k] for p in PARSERS] + [total[k]] for k in tasks}
    if world > 1:
        t = torch.tensor([counts[k] for k in tasks], dtype=torch.float64, device=lm.device)
        dist.all_reduce(t)
        counts = {k: t[i].tolist() for i, k in enumerate(tasks)}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, preds)
        preds = [p for part in gathered for p in part]
    preds.sort(key=lambda p: p["row"])  # the split's row order, each row once
    for p in preds:
        del p["row"]
    by_parser = {p: None if hidden else {k: c[j] / c[-1] for k, c in counts.items() if c[-1]}
                 for j, p in enumerate(PARSERS)}
    acc = by_parser[parser]
    if was_training:
        lm.model.train()
    return {"accuracy": acc, "mean": None if acc is None else sum(acc.values()) / max(1, len(acc)),
            "parser": parser, "accuracy_by_parser": by_parser, "hidden": hidden,
            "n": {k: int(c[-1]) for k, c in counts.items()}, "predictions": preds}


def second_parser(parser: str) -> str:
    """The parser reported beside the configured one: match beside blink (or lenient), blink beside match."""
    return "blink" if parser == "match" else "match"


def eval_metrics(split: str, res: dict) -> dict[str, float]:
    """MLflow metrics of one evaluated split: `<split>_accuracy` and `<split>/<task>` under the configured parser,
    `<split>_<other>_accuracy` and `<split>_<other>/<task>` under `second_parser` (absent from older results)."""
    out = {f"{split}_accuracy": res["mean"], **{f"{split}/{t}": a for t, a in res["accuracy"].items()}}
    other = (res.get("accuracy_by_parser") or {}).get(second_parser(res.get("parser", "blink")))
    if other:
        out[f"{split}_{second_parser(res['parser'])}_accuracy"] = sum(other.values()) / len(other)
        out.update({f"{split}_{second_parser(res['parser'])}/{t}": a for t, a in other.items()})
    return out


def eval_loader(lm, rows, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                cache_bytes: int = 0, persistent: bool = False, group_by_length: bool = True, split: str = "") -> tuple:
    """(loader, batches, scored): this rank's share of `rows` in batches of prompts (left-padded). A rank out of
    rows runs a dummy batch (row 0, not scored) so that every rank runs the same number of collectives.
    `group_by_length`: batches of rows of similar prompt length (estimated without encoding), fewer padded
    positions in every prefill; else rows rank, rank + world, … in order. `split` names the split in data errors."""
    if group_by_length and hasattr(lm.builder, "prompt_text"):  # similar lengths together (livr/data/lengths.py)
        from livr.model.flops import model_config

        batches, scored = grouped_batches(prompt_lengths(rows, lm.builder, model_config(lm.model)), batch_size, rank,
                                          world)
    else:
        mine = list(range(rank, len(rows), world))
        n_batches = -(-len(range(0, len(rows), world)) // batch_size) if world > 1 else -(-len(mine) // batch_size)
        batches = [mine[b * batch_size : (b + 1) * batch_size] or [0] for b in range(n_batches)]
        scored = [len(mine[b * batch_size : (b + 1) * batch_size]) for b in range(n_batches)]
    n_batches = len(batches)
    loader = make_loader(EncodedRows(rows, lm.builder, with_answer=False, cache_bytes=cache_bytes, split=split), batches,
                         lm.tokenizer.pad_token_id, num_workers=num_workers if n_batches > 1 else 0,
                         padding_side="left", persistent=persistent,
                         pin_memory=lm.device.type == "cuda")
    return loader, batches, scored


def write_submission(path: str, predictions: list[dict]) -> str:
    """BLINK's final prediction file for its leaderboard (EvalAI): one JSON object {idx: "(A)", ...}
    over all tasks; a row with no parsed answer gets BLINK's own failure marker "(Z)"."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out = {p["idx"]: p.get("prediction") or FAILED for p in predictions}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)
    return path


def write_eval(path: str, results: dict, meta: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"results": results, **(meta or {})}, f, indent=1)
    os.replace(tmp, path)


def table1(rows: list[tuple[str, dict[str, float] | None]], tasks: list[str] | None = None) -> str:
    """The paper's Table-1 layout (markdown): one row per method, task columns + mean, accuracy in %.
    A row whose accuracy is None (a split with hidden answers, BLINK test) reads "n/a"."""
    present = {t for _, acc in rows for t in acc or {}}
    tasks = tasks or [t for t in PAPER_TASKS if t in present] + sorted(present - set(PAPER_TASKS))
    head = "| method | " + " | ".join(TASK_SHORT.get(t, t) for t in tasks) + " | mean |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for name, acc in rows:
        if acc is None:
            lines.append(f"| {name} | " + " | ".join("n/a" for _ in tasks) + " | n/a |")
            continue
        cells = [f"{100 * acc[t]:.2f}" if t in acc else "–" for t in tasks]
        vals = [acc[t] for t in tasks if t in acc]
        mean = f"{100 * sum(vals) / len(vals):.2f}" if vals else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def split_accuracy(res: dict, parser: str | None = None, where: str = "") -> dict[str, float] | None:
    """One split's per-task accuracy from eval.json: the configured parser's, or `parser`'s."""
    if parser is None or parser == res.get("parser", "blink"):
        return res["accuracy"]
    by = res.get("accuracy_by_parser") or {}
    if parser not in by:
        raise DataError(f"{where}: no accuracy under parser {parser!r} (evaluated before it existed: run livr eval again)")
    return by[parser]


def run_label(mode: str | None, num_latents) -> str:
    """How `livr eval` and `livr report` name a run's row: SFT or LIVR (K=…)."""
    return "SFT" if mode == "sft" else f"LIVR (K={num_latents})"


def run_rows(run_dirs: list[str], split: str = "test", parser: str | None = None) -> list[tuple[str, dict[str, float]]]:
    """Rows for `table1` from run directories: zero-shot (when recorded), then each run by its mode; `parser`:
    the accuracy under that parser (eval.json's accuracy_by_parser) instead of the configured one."""
    rows = []
    for d in run_dirs:
        zs = os.path.join(d, "eval_zero_shot.json")
        if os.path.exists(zs) and not any(r[0] == "zero-shot" for r in rows):
            with open(zs) as f:
                rows.insert(0, ("zero-shot", split_accuracy(json.load(f)["results"][split], parser, zs)))
        with open(os.path.join(d, "eval.json")) as f:
            ev = json.load(f)
        label = run_label(ev.get("mode"), ev.get("num_latents"))
        rows.append((label, split_accuracy(ev["results"][split], parser, os.path.join(d, "eval.json"))))
    return rows
