"""Mutation testing for the method modules: does the test suite notice a realistic bug?

    python bench/mutation.py                      # the whole catalogue (bench/mutants.py)
    python bench/mutation.py --list               # the catalogue, each mutant checked for staleness; runs nothing
    python bench/mutation.py --only loss_no_shift mask_causality_dropped
    python bench/mutation.py --module livr/method/mask.py --timeout 300 --json /tmp/mutation.json

A report, not a gate (docs/testing.md): it exits 0 whatever the kill rate (2 on a usage error, or when
the campaign cannot be trusted: a failing unmutated selection it was told not to deselect, or a canary
that survives). Not run in CI.

How it works. The working tree (git-tracked + untracked-not-ignored files; never .venv, .git, runs/,
mlruns/, mlflow.db) is copied once into a temporary directory. Nothing in the working tree is ever
written. `livr` is installed editable into .venv (pointing at the working tree), so every pytest runs
with cwd = the copy and PYTHONPATH = the copy; the editable finder sits at the *end* of sys.meta_path,
so the copy's `livr` is the one imported. A canary mutant (`raise ImportError` at the top of
livr/method/mask.py) proves it before each campaign: if the canary survives, the script stops.

Then: the unmutated union of all selected mutants' tests must pass in the copy (tests that fail there —
another engineer's work in progress — are reported and deselected from every mutant run, or the run
stops with --strict-baseline). For each mutant: its `find` snippet must occur exactly once in its file
(else the mutant is "stale": the code moved on, update the catalogue), the snippet is replaced, its
tests run with `python -m pytest -x -q -p no:cacheprovider` under a timeout, the file is restored.

Status: killed (pytest failed: a test or collection error), survived (all selected tests passed),
timeout, stale, error (nothing to run: every test path of the selection is missing), equivalent
(declared equivalent in the catalogue, and it survived; a declared-equivalent mutant that gets killed
is reported as killed, with a note: the declaration is wrong).
kill_rate = killed / (mutants - equivalent - stale).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from mutants import CATALOGUE, Mutant, tests_for

EXCLUDE_TOP = {".venv", ".git", "runs", "mlruns", "mlflow.db", "mlartifacts", "outputs", "ray_results"}
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LIVR_QUIET": "1",
       "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONDONTWRITEBYTECODE": "1"}  # a reverted file must never be shadowed by a mutant's .pyc
CANARY = Mutant("canary_import_error", "livr/method/mask.py", "from __future__ import annotations\n",
                "from __future__ import annotations\nraise ImportError('mutation canary: this copy of livr is imported')\n",
                ["tests/method/test_method.py::test_bottleneck_mask_rules"],
                "not a bug: proves that the copy's livr (not the editable install's) is the one under test")


@dataclass
class Result:
    mutant: Mutant
    status: str
    seconds: float = 0.0
    failing: str = ""
    note: str = ""


# ----------------------------------------------------------------------------- the copy
def tree_files(root: str) -> list[str]:
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode()
    files = []
    for rel in sorted(set(filter(None, out.split("\0")))):
        if rel.split("/")[0] in EXCLUDE_TOP or "__pycache__" in rel.split("/"):
            continue
        if os.path.isfile(os.path.join(root, rel)) and not os.path.islink(os.path.join(root, rel)):
            files.append(rel)
    return files


def copy_tree(root: str, dest: str) -> int:
    files = tree_files(root)
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(root, rel), os.path.join(dest, rel))
    return len(files)


# ----------------------------------------------------------------------------- selections
COLLECTED: set[str] | None = None  # every test id of the copy (set by collect()); None = do not check


def collect(copy: str, files: list[str]) -> set[str]:
    """The node ids pytest collects from `files` in the copy (so renamed tests become "missing", not errors)."""
    _, out, _ = run_pytest(copy, ["--collect-only", *files], 600)  # (-q is already on: one id a line)
    return {line.strip() for line in out.splitlines() if "::" in line and not line.startswith(("ERROR", "FAILED"))}


def known(node: str) -> bool:
    if COLLECTED is None or "::" not in node:
        return True
    return node in COLLECTED or any(c.startswith(node + "[") for c in COLLECTED)


def expand(copy: str, tests: list[str]) -> tuple[list[str], list[str]]:
    """Test paths/node ids relative to the copy; globs expanded there; "-node_id" becomes a --deselect
    (to leave a slow test out of a glob). Files that do not exist and node ids that pytest does not collect
    (a test renamed or removed) are left out and returned as missing. Returns (pytest args, missing)."""
    present, missing, deselect = [], [], []
    for t in tests:
        if t.startswith("-"):
            if os.path.exists(os.path.join(copy, t[1:].split("::")[0])) and known(t[1:]):
                deselect += ["--deselect", t[1:]]
            continue
        path = t.split("::")[0]
        if any(c in path for c in "*?[") and "::" not in t:
            hits = sorted(os.path.relpath(p, copy) for p in glob.glob(os.path.join(copy, path)))
            present += [h for h in hits if h not in present]
        elif os.path.exists(os.path.join(copy, path)) and known(t):
            if t not in present:
                present.append(t)
        else:
            missing.append(t)
    return (present + deselect if present else []), missing


def selection(copy: str, m: Mutant) -> tuple[list[str], list[str]]:
    return expand(copy, m.tests or tests_for(m.file))


def test_files(copy: str, mutants: list[Mutant]) -> list[str]:
    files: list[str] = []
    for m in mutants:
        for t in m.tests or tests_for(m.file):
            path = t.lstrip("-").split("::")[0]
            for f in sorted(glob.glob(os.path.join(copy, path))):
                rel = os.path.relpath(f, copy)
                if rel not in files:
                    files.append(rel)
    return files


# ----------------------------------------------------------------------------- pytest
def pytest_env(copy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME",)}
    env.update(ENV)
    env["PYTHONPATH"] = copy + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(venv_bin), "torch_extensions"))
    return env


def run_pytest(copy: str, args: list[str], timeout: float) -> tuple[int | None, str, float]:
    """(returncode or None on timeout, combined output, seconds). The whole process group is killed on timeout."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, cwd=copy, env=pytest_env(copy), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own pytest and its children, nothing else
            proc.wait()
            rc = None
        except BaseException:  # Ctrl-C / SIGTERM: never leave our pytest running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        log.seek(0)
        return rc, log.read(), time.perf_counter() - t0


_FAIL = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", re.MULTILINE)  # (parametrized ids may hold spaces)


def failing_ids(output: str) -> list[str]:
    return [m.group(2) for m in _FAIL.finditer(output)]


def last_line(output: str, width: int = 100) -> str:
    lines = [x for x in output.strip().splitlines() if x.strip()]
    return lines[-1][:width] if lines else ""


# ----------------------------------------------------------------------------- one mutant
def occurrences(copy: str, m: Mutant) -> int:
    path = os.path.join(copy, m.file)
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return f.read().count(m.find)


def run_mutant(copy: str, m: Mutant, timeout: float, deselect: list[str]) -> Result:
    n = occurrences(copy, m)
    if n != 1:
        why = "file missing" if not os.path.isfile(os.path.join(copy, m.file)) else f"find occurs {n}x"
        return Result(m, "stale", note=why + (" (stale-tolerant)" if m.stale_ok else ""))
    tests, missing = selection(copy, m)
    if not tests:
        return Result(m, "error", note=f"no test of {missing} exists")
    path = os.path.join(copy, m.file)
    with open(path) as f:
        original = f.read()
    try:
        with open(path, "w") as f:
            f.write(original.replace(m.find, m.replace, 1))
        args = ["-x", *tests, *[a for d in deselect for a in ("--deselect", d)]]
        rc, out, secs = run_pytest(copy, args, timeout)
    finally:
        with open(path, "w") as f:
            f.write(original)
    note = f"missing: {', '.join(missing)}" if missing else ""
    if rc is None:
        return Result(m, "timeout", secs, note=note)
    if rc == 0:  # the note says what ran: "N passed, M deselected in T s"
        note = " ".join(x for x in (last_line(out).strip("= "), note) if x)
        return Result(m, "equivalent" if m.equivalent else "survived", secs, note=note)
    # any other exit is a kill: failed tests (1), a collection error (2), or, for a node-id selection whose
    # module no longer imports, "found no collectors" (4). The unmutated run already proved the selection valid.
    first = (failing_ids(out) or [f"(pytest exit {rc}: {last_line(out)})"])[0]
    if m.equivalent:
        note = "declared equivalent but killed: fix the catalogue. " + note
    return Result(m, "killed", secs, first, note)


# ----------------------------------------------------------------------------- report
def table(results: list[Result]) -> str:
    rows = [("name", "module", "status", "seconds", "first failing test / note")]
    for r in results:
        rows.append((r.mutant.name, r.mutant.file, r.status, f"{r.seconds:.1f}",
                     " | ".join(x for x in (r.failing, r.note) if x)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 26)
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    n = len(results)
    count = {s: sum(r.status == s for r in results) for s in ("killed", "survived", "equivalent", "stale")}
    live = n - count["equivalent"] - count["stale"]
    rate = count["killed"] / live if live else 0.0
    return (f"mutants={n} killed={count['killed']} survived={count['survived']} equivalent={count['equivalent']} "
            f"stale={count['stale']} kill_rate={rate:.3f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mutation testing over the LIVR method modules (see docs/testing.md).")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    p.add_argument("--module", action="append", metavar="FILE", help="run only the mutants of this file (repeatable)")
    p.add_argument("--list", action="store_true", help="print the catalogue with a staleness check; run nothing")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutant's pytest (default 300)")
    p.add_argument("--skip-equivalent", action="store_true", help="do not run mutants declared equivalent")
    p.add_argument("--strict-baseline", action="store_true",
                   help="stop when the unmutated selection fails (default: report and deselect those tests)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (trust that it passes)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    return p.parse_args(argv)


def pick(args: argparse.Namespace) -> list[Mutant]:
    names = [m.name for m in CATALOGUE]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        sys.exit(f"bench/mutants.py: duplicate mutant names {sorted(dupes)}")
    chosen = list(CATALOGUE)
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            print(f"unknown mutant(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
            sys.exit(2)
        chosen = [m for m in chosen if m.name in args.only]
    if args.module:
        mods = {os.path.normpath(x) for x in args.module}
        chosen = [m for m in chosen if os.path.normpath(m.file) in mods]
        if not chosen:
            print(f"no mutant in {sorted(mods)} (see --list)", file=sys.stderr)
            sys.exit(2)
    if args.skip_equivalent:
        chosen = [m for m in chosen if not m.equivalent]
    return chosen


def main(argv: list[str] | None = None) -> int:
    global COLLECTED
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleans up like Ctrl-C (finally blocks run)
    chosen = pick(args)
    if args.list:
        for m in chosen:
            n = occurrences(ROOT, m)
            flag = "ok   " if n == 1 else f"STALE({n})"
            eq = "  [equivalent]" if m.equivalent else ""
            print(f"{flag} {m.name:<38} {m.file:<24} {m.why}{eq}")
        stale = sum(occurrences(ROOT, m) != 1 for m in chosen)
        print(f"{len(chosen)} mutants, {stale} stale")
        return 0

    tmp = tempfile.mkdtemp(prefix="livr-mutation-")
    copy = os.path.join(tmp, "tree")
    t_start = time.perf_counter()
    try:
        n_files = copy_tree(ROOT, copy)
        print(f"[mutation] copied {n_files} files of {ROOT} to {copy}", flush=True)

        COLLECTED = collect(copy, test_files(copy, [CANARY, *chosen]))
        gone = sorted({t for m in chosen for t in selection(copy, m)[1]})
        if gone:
            print(f"[mutation] not in the suite (renamed or removed?), left out: {', '.join(gone)}", flush=True)

        deselect: list[str] = []
        if not args.no_baseline:
            union: list[str] = list(CANARY.tests)  # the canary's test must pass unmutated, or its kill proves nothing
            for m in chosen:
                if occurrences(copy, m) == 1:
                    args_ = selection(copy, m)[0]
                    picked = [t for i, t in enumerate(args_) if t != "--deselect" and (i == 0 or args_[i - 1] != "--deselect")]
                    union += [t for t in picked if t not in union]  # (the union runs what any mutant deselects, too)
            whole = {t for t in union if "::" not in t}
            files = [t for t in union if "::" not in t or t.split("::")[0] not in whole]  # each test once
            rc, out, secs = run_pytest(copy, files, max(args.timeout, 900))
            if rc != 0:
                deselect = [t for t in failing_ids(out) if "::" in t]
                print(f"[mutation] the UNMUTATED selection fails in {secs:.0f} s (rc={rc}); failing: "
                      f"{', '.join(failing_ids(out)) or last_line(out, 300)}")
                if args.strict_baseline or rc is None or not deselect:
                    print("[mutation] stopping: fix the suite first (or drop --strict-baseline)")
                    return 2
                print(f"[mutation] deselecting those {len(deselect)} tests from every mutant run", flush=True)
            else:
                print(f"[mutation] unmutated selection passes in {secs:.0f} s: {' '.join(files)}", flush=True)

        canary = run_mutant(copy, CANARY, args.timeout, [])
        if canary.status != "killed":
            print(f"[mutation] the canary {canary.status}: the tests do not import the copy's livr. Stopping.")
            return 2
        print(f"[mutation] canary killed in {canary.seconds:.1f} s: the copy's livr is under test", flush=True)

        results = []
        for i, m in enumerate(chosen, 1):
            r = run_mutant(copy, m, args.timeout, deselect)
            results.append(r)
            print(f"[mutation] {i}/{len(chosen)} {m.name}: {r.status} ({r.seconds:.1f} s) {r.failing} {r.note}".rstrip(),
                  flush=True)
    finally:
        if args.keep:
            print(f"[mutation] kept {copy}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    total = time.perf_counter() - t_start
    print()
    print(table(results))
    print()
    survivors = [r for r in results if r.status == "survived"]
    if survivors:
        print("survivors (each needs a test that kills it, or an `equivalent` reason):")
        for r in survivors:
            print(f"  {r.mutant.name}: {r.mutant.why}")
    other = {s: sum(r.status == s for r in results) for s in ("timeout", "error")}
    ran = [r.seconds for r in results if r.seconds]
    print(f"timeout={other['timeout']} error={other['error']} deselected={len(deselect)} "
          f"total_s={total:.0f} mean_s_per_mutant={sum(ran) / max(1, len(ran)):.1f}")
    if deselect:
        print(f"deselected (failing unmutated): {', '.join(deselect)}")
    print(summary(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary(results), "total_s": total, "deselected": deselect,
                       "results": [{"name": r.mutant.name, "file": r.mutant.file, "status": r.status,
                                    "seconds": round(r.seconds, 1), "failing": r.failing, "note": r.note,
                                    "why": r.mutant.why, "equivalent": r.mutant.equivalent} for r in results]},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
