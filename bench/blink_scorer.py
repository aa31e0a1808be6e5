"""How closely livr's answer parsers follow BLINK's official scoring, on BLINK's own released model outputs.

    python bench/blink_scorer.py PATH_TO_BLINK_REPO

PATH_TO_BLINK_REPO is a checkout of https://github.com/zeyofu/BLINK_Benchmark (a work tree, or a bare git
directory, read with `git show HEAD:…`). Nothing of BLINK is copied into livr: its files are read here, at run
time. Every entry of `eval/saved_outputs/*/*.json` (val and test) holds the raw model output
(`full_prediction`) and the answer BLINK extracted from it (`prediction`), either by its rule
(`analyze_answer` in eval/test_benchmark.py) or, where the rule cannot decide, by a GPT-3.5 judge.

The bench applies (1) an independent re-implementation of BLINK's rule, which says where the rule decides;
(2) livr's parse_answer(parser="blink"); (3) livr's parse_answer(parser="lenient"), and compares (2) and (3)
with BLINK's saved `prediction` where the rule decides (the judge's answers cannot be reproduced offline).
(4) livr's parse_answer(parser="match") (BLINK's rule, then a judge-free match against the row's choices):
(a) its agreement with the judge's saved answer on the val rows BLINK's rule leaves to the judge, for the eight
tasks whose choices are fixed strings (FIXED_CHOICES), a judge's "(Z)" counting as None; (b) the val accuracy
cells (livr's nine tasks × BLINK's 19 models) it reproduces exactly (to 0.01%), beside the blink parser's.
A "published" cell is the accuracy of BLINK's saved val `prediction`s (exact string equality with the answer,
as BLINK's eval/evaluate.py scores them): their mean over the 14 tasks gives every model's Val column of
BLINK's README leaderboard (PUBLISHED_VAL), which the bench checks.

Number of choices per entry: BLINK's analyze_answer needs it (all_choices = ['(A)', …][:len(choices)]) and the
saved outputs do not store the choices. Each BLINK task has a fixed number of choices, and every choice letter
occurs as a gold answer in its val split, so the bench takes, per task, the number of distinct gold letters
among the saved val entries, and checks it against BLINK's published per-task counts (CHOICES below).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict

from livr.data.prompts import parse_answer

# BLINK's tasks and their number of choices (BLINK-Benchmark/BLINK on the hub); checked against the data.
CHOICES = {"Art_Style": 2, "Counting": 4, "Forensic_Detection": 4, "Functional_Correspondence": 4, "IQ_Test": 4,
           "Jigsaw": 2, "Multi-view_Reasoning": 2, "Object_Localization": 2, "Relative_Depth": 2,
           "Relative_Reflectance": 3, "Semantic_Correspondence": 4, "Spatial_Relation": 2,
           "Visual_Correspondence": 4, "Visual_Similarity": 2}
PREFIX = "eval/saved_outputs/"
# The choice texts of the eight BLINK tasks whose choices are the same strings on every row: BLINK's prompts
# (`prompt` of BLINK-Benchmark/BLINK; livr's builders copy them: livr/data/build/{coco,artbench,nights,mid}.py),
# also the "(A) …" lines the models echo in the saved outputs.
SECOND_THIRD = ["the second image", "the third image"]
FIXED_CHOICES = {"Art_Style": SECOND_THIRD, "Jigsaw": SECOND_THIRD, "Visual_Similarity": SECOND_THIRD,
                 "Relative_Reflectance": ["A is darker", "B is darker", "About the same"],
                 "Relative_Depth": ["A is closer", "B is closer"], "Multi-view_Reasoning": ["left", "right"],
                 "Spatial_Relation": ["yes", "no"],
                 "Forensic_Detection": ["the first image", "the second image", "the third image", "the fourth image"]}
POINTS = ["Point A", "Point B", "Point C", "Point D"]
# per-task choices for (b); Counting and IQ_Test have per-row choices the saved outputs do not hold: letters only
ROW_CHOICES = {**FIXED_CHOICES, "Visual_Correspondence": POINTS, "Semantic_Correspondence": POINTS,
               "Functional_Correspondence": POINTS, "Object_Localization": ["Box A", "Box B"]}
LIVR_TASKS = ["Counting", "Jigsaw", "Object_Localization", "Visual_Correspondence", "Art_Style",
              "Semantic_Correspondence", "Functional_Correspondence", "Relative_Reflectance", "Visual_Similarity"]
# BLINK's README leaderboard, Val (1,901) column, by saved-output folder (the "* concatenate images" runs excluded)
PUBLISHED_VAL = {"GPT4o": 60.0, "GPT4Turbo": 54.6, "GPT4V": 51.1, "GeminiProVision": 45.2, "llava-v1.6-34b": 46.8,
                 "OPUS": 44.1, "Yi_VL_34B": 41.7, "QwenVLMax": 40.3, "llava-v1.5-13b-xtuner": 42.0, "Yi_VL_6B": 38.7,
                 "llava-v1.5-7b-xtuner": 39.4, "llava_v1.5_13b": 42.7, "instructblip_13b": 42.2, "cogvlm-chat": 41.5,
                 "instructblip_7b": 39.7, "flamingov2": 39.2, "llava_v1.5_7b": 37.1, "llava-internlm2-7b": 37.7,
                 "MiniGPT-4-v2": 34.2}


def blink_rule(output, num_choices: int) -> tuple[bool, str | None]:
    """(decided, prediction) following BLINK's analyze_answer step by step; decided=False where BLINK calls its
    GPT-3.5 judge. A non-string output makes BLINK's code raise inside its try/except: prediction None."""
    all_choices = ["(A)", "(B)", "(C)", "(D)", "(E)"][:num_choices]
    if not isinstance(output, str):
        return True, None
    intersect = list(set(all_choices).intersection(set(output.split())))
    intersect_last = list(set(all_choices).intersection(set(output.split("\n\n")[-1].split())))
    if output in ["A", "B", "C", "D", "E"]:
        return True, "(" + output + ")"
    if output in ["(A)", "(B)", "(C)", "(D)", "(E)"]:
        return True, output
    if (len(intersect) != 1 and len(intersect_last) != 1) or len(intersect) < 1:
        return False, None
    return True, (intersect_last if len(intersect_last) == 1 else intersect)[0]


def livr(output, num_choices: int, parser: str, choices: list[str] | None = None) -> str | None:
    letter = parse_answer(output, num_choices, parser, choices) if isinstance(output, str) else None
    return None if letter is None else f"({letter})"


class Repo:
    """BLINK's files from a work tree or a bare git directory."""

    def __init__(self, path: str):
        self.path = path
        self.tree = os.path.isdir(os.path.join(path, PREFIX))

    def files(self) -> list[str]:
        if self.tree:
            root = os.path.join(self.path, PREFIX)
            return sorted(os.path.relpath(os.path.join(d, f), self.path) for d, _, fs in os.walk(root)
                          for f in fs if f.endswith(".json"))
        out = subprocess.run(["git", "-C", self.path, "ls-tree", "-r", "HEAD", "--name-only", "--", PREFIX],
                             capture_output=True, text=True, check=True).stdout
        return sorted(p for p in out.splitlines() if p.endswith(".json"))

    def read(self, rel: str):
        if self.tree:
            with open(os.path.join(self.path, rel)) as f:
                return json.load(f)
        out = subprocess.run(["git", "-C", self.path, "show", f"HEAD:{rel}"], capture_output=True, check=True).stdout
        return json.loads(out)


def task_of(rel: str) -> str:
    """'eval/saved_outputs/GPT4V/Art Style.json' and '…/Art Style_concat.json' -> 'Art_Style'."""
    name = os.path.basename(rel)[: -len(".json")]
    return name.removesuffix("_concat").replace(" ", "_")


def load(repo: Repo) -> list[dict]:
    entries = []
    for rel in repo.files():
        model = rel[len(PREFIX):].split("/")[0]
        for split, rows in repo.read(rel).items():
            for r in rows:
                entries.append({"model": model, "task": task_of(rel), "split": split, **r})
    return entries


def choice_counts(entries: list[dict]) -> dict[str, int]:
    letters = defaultdict(set)
    for e in entries:
        if e["split"] == "val" and isinstance(e.get("answer"), str) and e["answer"] != "hidden":
            letters[e["task"]].add(e["answer"])
    counts = {t: len(ls) for t, ls in letters.items()}
    for t, n in sorted(counts.items()):
        if CHOICES.get(t, n) != n:
            print(f"warning: {t}: {n} distinct gold letters in val, BLINK lists {CHOICES[t]} choices", file=sys.stderr)
    return {**CHOICES, **counts}


def measure(entries: list[dict], counts: dict[str, int]) -> dict:
    c = Counter()
    diffs = []
    for e in entries:
        n, out, saved = counts[e["task"]], e.get("full_prediction"), e.get("prediction")
        decided, ours = blink_rule(out, n)
        b, lenient = livr(out, n, "blink"), livr(out, n, "lenient")
        c["total"] += 1
        c["agree_blink_all"] += b == saved or (b is None and saved == "(Z)")
        c["agree_lenient_all"] += lenient == saved or (lenient is None and saved == "(Z)")
        if not decided:
            c["judge"] += 1
            c["judge_blink_none"] += b is None
            c["judge_lenient_none"] += lenient is None
            continue
        c["decided"] += 1
        c["rule_matches_saved"] += ours == saved
        c["agree_blink"] += b == saved
        c["agree_lenient"] += lenient == saved
        c["blink_matches_rule"] += b == ours
        if b != saved and len(diffs) < 5:
            diffs.append((e["model"], e["task"], e["idx"], out, saved, b))
    return {"counts": c, "diffs": diffs}


def judge_letter(saved) -> str | None:
    """The judge's choice as "(X)" ("(C) About the same" -> "(C)"); its "(Z)" (no match) -> None."""
    if not isinstance(saved, str) or len(saved) < 3 or saved[0] != "(" or saved[2] != ")" or saved[1] == "Z":
        return None
    return saved[:3]


def judged_agreement(entries: list[dict], counts: dict[str, int]) -> dict[str, list[int]]:
    """Per fixed-string task: [judged val rows, rows where livr match gives the judge's answer]."""
    out = defaultdict(lambda: [0, 0])
    for e in entries:
        if e["split"] != "val" or e["task"] not in FIXED_CHOICES or e["model"] not in PUBLISHED_VAL:
            continue
        n, text = counts[e["task"]], e.get("full_prediction")
        if blink_rule(text, n)[0]:
            continue
        out[e["task"]][0] += 1
        out[e["task"]][1] += livr(text, n, "match", FIXED_CHOICES[e["task"]]) == judge_letter(e.get("prediction"))
    return out


def val_cells(entries: list[dict], counts: dict[str, int]) -> dict[tuple[str, str], dict[str, float]]:
    """(model, task) -> accuracy % of BLINK's saved predictions ("published"), livr blink, livr match."""
    hits = defaultdict(lambda: Counter())
    for e in entries:
        if e["split"] != "val" or e["model"] not in PUBLISHED_VAL:
            continue
        n, text, gold = counts[e["task"]], e.get("full_prediction"), e["answer"]
        h = hits[e["model"], e["task"]]
        h["n"] += 1
        h["published"] += e.get("prediction") == gold
        h["blink"] += livr(text, n, "blink") == gold
        h["match"] += livr(text, n, "match", ROW_CHOICES.get(e["task"])) == gold
    return {k: {p: 100 * h[p] / h["n"] for p in ("published", "blink", "match")} for k, h in hits.items()}


def report_match(entries: list[dict], counts: dict[str, int]) -> dict:
    """Prints (a) and (b); returns the key figures."""
    agree = judged_agreement(entries, counts)
    print("\n(a) livr match vs BLINK's GPT-3.5 judge, val rows its rule leaves to the judge (judge (Z) = None)\n")
    print("| task | judged rows | match = judge |\n|---|---|---|")
    for t, (n, ok) in sorted(agree.items()):
        print(f"| {t} | {n} | {pct(ok, n)} |")
    judged, ok = sum(v[0] for v in agree.values()), sum(v[1] for v in agree.values())
    print(f"| all eight | {judged} | {pct(ok, judged)} |")
    cells = val_cells(entries, counts)
    models = sorted(PUBLISHED_VAL)
    overall = {m: sum(cells[m, t]["published"] for t in CHOICES) / len(CHOICES) for m in models}
    # the README gives the 2-decimal mean to 1 decimal (OPUS: 44.046 -> 44.05 -> 44.1)
    reproduced = sum(abs(round(overall[m], 2) - PUBLISHED_VAL[m]) <= 0.05 + 1e-9 for m in models)
    print(f"\n(b) val accuracy cells, livr's nine tasks × {len(models)} models: published (BLINK's saved predictions; "
          f"their 14-task means give the README's Val column for {reproduced} of {len(models)} models) / blink / match; "
          "= marks a cell equal to the published one\n")
    print("| model | " + " | ".join(LIVR_TASKS) + " |\n|---|" + "---|" * len(LIVR_TASKS))
    eq = Counter()
    for m in models:
        row = []
        for t in LIVR_TASKS:
            c = {p: round(v, 2) for p, v in cells[m, t].items()}  # equal as published: to 0.01%
            eq["blink"] += c["blink"] == c["published"]
            eq["match"] += c["match"] == c["published"]
            row.append(f"{c['published']:.2f} / {c['blink']:.2f}{'=' * (c['blink'] == c['published'])} / "
                       f"{c['match']:.2f}{'=' * (c['match'] == c['published'])}")
        print(f"| {m} | " + " | ".join(row) + " |")
    return {"judged": judged, "judged_agreement": ok / max(1, judged), "cells": len(models) * len(LIVR_TASKS),
            "cells_equal_match": eq["match"], "cells_equal_blink": eq["blink"], "published_val_reproduced": reproduced}


def pct(a: int, b: int) -> str:
    return f"{100 * a / b:.2f}%" if b else "n/a"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        print("usage: python bench/blink_scorer.py PATH_TO_BLINK_REPO (work tree or bare git dir)", file=sys.stderr)
        return 2
    entries = load(Repo(argv[0]))
    if not entries:
        print(f"no {PREFIX}*/*.json entries in {argv[0]}", file=sys.stderr)
        return 1
    counts = choice_counts(entries)
    print("choices per task (distinct gold letters in val): "
          + ", ".join(f"{t}={counts[t]}" for t in sorted({e['task'] for e in entries})))
    print()
    print("| split | entries | rule decides | judge | BLINK rule (ours) = saved | livr blink = saved "
          "| livr lenient = saved | livr blink = saved, all (None≡(Z)) | livr lenient = saved, all |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for split in ("val", "test", "all"):
        part = [e for e in entries if split == "all" or e["split"] == split]
        r = results[split] = measure(part, counts)
        c = r["counts"]
        print(f"| {split} | {c['total']} | {c['decided']} | {c['judge']} | {pct(c['rule_matches_saved'], c['decided'])} "
              f"| {pct(c['agree_blink'], c['decided'])} ({c['decided'] - c['agree_blink']} differ) "
              f"| {pct(c['agree_lenient'], c['decided'])} ({c['decided'] - c['agree_lenient']} differ) "
              f"| {pct(c['agree_blink_all'], c['total'])} | {pct(c['agree_lenient_all'], c['total'])} |")
    c = results["all"]["counts"]
    print()
    print(f"where BLINK calls its judge ({c['judge']} entries) livr blink answers None in {c['judge_blink_none']}, "
          f"livr lenient in {c['judge_lenient_none']}")
    for model, task, idx, out, saved, b in results["all"]["diffs"]:
        print(f"  differs: {model} {task} {idx}: output {out!r:.80} saved {saved!r} livr-blink {b!r}")
    m = report_match(entries, counts)
    print(f"entries={c['total']} decided={c['decided']} judge={c['judge']} "
          f"rule_eq_saved={c['rule_matches_saved']} agree_blink={c['agree_blink']} agree_lenient={c['agree_lenient']} "
          f"agree_blink_pct={100 * c['agree_blink'] / c['decided']:.2f} "
          f"agree_lenient_pct={100 * c['agree_lenient'] / c['decided']:.2f} "
          f"blink_eq_rule={c['blink_matches_rule']} judged_rows={m['judged']} "
          f"judged_agreement={m['judged_agreement']:.4f} cells={m['cells']} cells_equal_match={m['cells_equal_match']} "
          f"cells_equal_blink={m['cells_equal_blink']} published_val_reproduced={m['published_val_reproduced']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
