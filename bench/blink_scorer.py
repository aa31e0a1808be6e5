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


def livr(output, num_choices: int, parser: str) -> str | None:
    letter = parse_answer(output, num_choices, parser) if isinstance(output, str) else None
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
    print(f"entries={c['total']} decided={c['decided']} judge={c['judge']} "
          f"rule_eq_saved={c['rule_matches_saved']} agree_blink={c['agree_blink']} agree_lenient={c['agree_lenient']} "
          f"agree_blink_pct={100 * c['agree_blink'] / c['decided']:.2f} "
          f"agree_lenient_pct={100 * c['agree_lenient'] / c['decided']:.2f} "
          f"blink_eq_rule={c['blink_matches_rule']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
