"""Run one builder: group-disjoint seeded splits, balanced answers, --exclude, streaming atomic output.

Output: OUT/<task>/{train,val,test}.parquet (BLINK schema; `data.source=OUT` loads it as it is),
OUT/<task>/provenance/<split>.jsonl (which source files and parameters made each row) and
OUT/<task>/livr_build.json (the request and the counts). Everything is written into a hidden temp dir
OUT/.<task>.tmp-<pid>-* and renamed into place at the end: a half-written task is never loadable, an
interrupted build leaves only a temp dir that the next build removes, and a finished build whose
request is unchanged is not redone."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from livr.data.build.common import (
    Skip,
    SourceError,
    balanced_label,
    encode_png,
    near_duplicate,
    prompt,
    rng_for,
)
from livr.data.build.dedup import load_index
from livr.data.prompts import OPEN_SUFFIX, choice_letters
from livr.data.tasks import IMAGE_COLUMNS
from livr.utils.atomic import replace_dir

BUILD_VERSION = 2  # bump when any builder's output changes: invalidates finished builds
MANIFEST = "livr_build.json"
SPLIT_ORDER = ("train", "val", "test")
BUILD_ORDER = ("test", "val", "train")  # held-out first: later splits drop near-duplicates of earlier ones
CHUNK = 32  # units prepared (and rows rendered) per batch of work handed to the workers


def partition(units_by_pool: dict, splits: dict, sizes: dict, seed: int, task: str, fractions=None,
              regroup=None) -> dict:
    """{split: [unit, ...]}: each pool's groups shuffled (seeded) and cut among the splits that draw from
    it, in proportion to `fractions` (default: the requested sizes), separately per stratum; units of a
    split are then shuffled (seeded) so that consecutive rows come from different groups."""
    out = {s: [] for s in SPLIT_ORDER if sizes.get(s, 0) > 0}
    by_pool: dict = {}
    for s in out:
        by_pool.setdefault(splits[s], []).append(s)
    for pool, members in by_pool.items():
        units = units_by_pool.get(pool, [])
        weights = [float((fractions or {}).get(s, sizes[s])) for s in members]
        strata: dict = {}
        for u in units:
            strata.setdefault(u.get("stratum", ""), {}).setdefault(u["group"], []).append(u)
        for stratum in sorted(strata):
            groups = sorted(strata[stratum])
            order = rng_for(seed, task, "groups", pool, stratum).permutation(len(groups))
            cuts, acc = [], 0.0
            for w in weights:
                acc += w
                cuts.append(round(len(groups) * acc / sum(weights)))
            start = 0
            for s, end in zip(members, cuts):
                for j in order[start:end]:
                    out[s].extend(strata[stratum][groups[j]])
                start = end
    for s, units in out.items():
        perm = rng_for(seed, task, "units", s).permutation(len(units))
        out[s] = [units[j] for j in perm]
        if regroup:  # e.g. FunKPoint: images are split first, then paired within their split
            out[s] = regroup(out[s], rng_for(seed, task, "regroup", s))
    return out


def _row(task: str, split: str, i: int, out: dict, layout: dict) -> dict:
    choices, images = list(out["choices"]), out["images"]
    if choices:
        answer = f"({choice_letters(len(choices))[out['answer']]})"
        full = prompt(out["text"], choices, **layout)
    else:
        answer, full = str(out["answer"]), f"{out['text']}\n{OPEN_SUFFIX}"
    row = {"idx": f"{task}_{split}_{i}", "question": out["question"], "sub_task": task}
    row.update({c: (encode_png(images[j]) if j < len(images) else None) for j, c in enumerate(IMAGE_COLUMNS)})
    row.update(choices=choices, answer=answer, prompt=full, explanation="")
    return row


def _fill(spec: dict, task: str, split: str, units: list, n: int, seed: int, exclude, used: dict, pool,
          progress: bool, stats: Counter, taken_hashes):
    """Yield (row, provenance) for up to n rows of one split, in a deterministic order."""
    k, weights = spec["labels"], spec.get("weights")
    ctx = spec["context"](units) if spec.get("context") else None
    others = set().union(*[v for s, v in used.items() if s != split])
    mine = used.setdefault(split, set())
    pending: list = []
    done = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"{task}/{split}", unit="row", leave=False, disable=None)  # None: on a terminal only

    def prep(arg):
        u, r = arg
        try:
            return spec["prepare"](u, rng_for(seed, task, split, "prepare", u["key"], r), ctx)
        except Skip as e:
            return e

    def accept(sample):
        nonlocal done
        label = balanced_label(seed, task, split, done, k, weights)
        ok = sample.get("labels")
        if ok is not None and label not in ok:
            return None
        done += 1
        mine.update(sample["images"])
        return sample, label, done - 1

    def flush(batch):
        rendered = list(pool.map(lambda a: spec["render"](a[0], a[1]), batch) if pool else
                        (spec["render"](s, lab) for s, lab, _ in batch))
        for (sample, label, i), out in zip(batch, rendered):
            prov = {"idx": f"{task}_{split}_{i}", "label": label, "images": list(sample["images"]),
                    "hashes": list(sample.get("hashes", ())), **sample.get("prov", {}), **out.pop("prov", {})}
            yield _row(task, split, i, out, spec.get("prompt", {})), prov
        if bar:
            bar.update(len(batch))

    try:
        for r in range(spec.get("rounds", 1)):
            for c in range(0, len(units), CHUNK):
                if done >= n:
                    break
                args = [(u, r) for u in units[c:c + CHUNK]]
                samples = list(pool.map(prep, args)) if pool else [prep(a) for a in args]
                batch = []
                for s in samples:
                    if done >= n:
                        break
                    if isinstance(s, Skip):
                        stats[s.kind] += 1
                        if stats["_shown"] < 3 and not os.environ.get("LIVR_QUIET"):
                            print(f"livr data build: {task}/{split}: skipped: {s}", file=sys.stderr)
                        stats["_shown"] += 1
                        continue
                    if others & set(s["images"]):
                        stats["cross-split image overlap"] += 1
                        continue
                    if exclude.duplicate(s.get("sources", ()), spec.get("dedup", "image")):
                        stats["excluded (near-duplicate of --exclude)"] += 1
                        continue
                    if near_duplicate(s.get("hashes", ()), taken_hashes):
                        stats["near-duplicate of another split"] += 1
                        continue
                    got = accept(s)
                    if got is None:
                        pending.append(s)
                        continue
                    batch.append(got)
                    while done < n:  # a waiting sample may fit the next label now
                        nxt = balanced_label(seed, task, split, done, k, weights)
                        j = next((j for j, p in enumerate(pending) if p.get("labels") is None
                                  or nxt in p["labels"]), None)
                        if j is None:
                            break
                        batch.append(accept(pending.pop(j)))
                yield from flush(batch)
        if done < n and pending:  # the source ran out of some class: fill from what waits, unbalanced
            stats["rows not balanced (a class ran out)"] += min(n - done, len(pending))
            batch = []
            for s in pending[: n - done]:
                label = min(s["labels"]) if s.get("labels") is not None else 0
                done += 1
                mine.update(s["images"])
                batch.append((s, label, done - 1))
            yield from flush(batch)
    finally:
        if bar:
            bar.close()
        stats["rows"] = done


def _recorded(path: str):
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f).get("request")
    except (OSError, ValueError):
        return None


def _clean_stale(out_dir: str, task: str) -> None:
    """Remove temp dirs that interrupted builds of this task left (their process is gone)."""
    for d in glob.glob(os.path.join(glob.escape(out_dir), f".{task}.tmp-*")):
        try:
            pid = int(os.path.basename(d).split("-")[1])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def run_build(task: str, spec: dict, source: str, out_dir: str, sizes: dict, *, seed: int = 42, exclude=(),
              clip: str | None = None, workers: int = 1, progress: bool = True) -> dict:
    """Build one task; returns the manifest ({"request", "counts", "path"})."""
    import pyarrow.parquet as pq

    from livr.data.synthetic import features

    source = os.path.abspath(os.path.expanduser(source))
    if not os.path.isdir(source):
        raise SourceError(f"{task}: --source {source}: not a directory")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    exclude = [os.path.abspath(os.path.expanduser(d)) for d in exclude]
    clip = os.path.abspath(os.path.expanduser(clip)) if clip else None
    request = {"build_version": BUILD_VERSION, "task": task, "source": source, "sizes": dict(sizes),
               "seed": seed, "exclude": exclude, "clip": clip}
    path = os.path.join(out_dir, task)
    if _recorded(path) == request:
        with open(os.path.join(path, MANIFEST)) as f:
            return {**json.load(f), "path": path, "reused": True}
    os.makedirs(out_dir, exist_ok=True)
    _clean_stale(out_dir, task)
    units_by_pool = spec["scan"](source)
    table = load_index(exclude, clip=clip, progress=progress)
    parts = partition(units_by_pool, spec["splits"], sizes, seed, task, spec.get("fractions"), spec.get("regroup"))
    schema = features().arrow_schema
    tmp = tempfile.mkdtemp(prefix=f".{task}.tmp-{os.getpid()}-", dir=out_dir)
    counts, used, taken = {}, {}, []
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        os.makedirs(os.path.join(tmp, "provenance"))
        for split in [s for s in BUILD_ORDER if s in parts]:
            stats: Counter = Counter()
            taken_hashes = np.array(taken, dtype=np.uint64)
            writer = pq.ParquetWriter(os.path.join(tmp, f"{split}.parquet"), schema)
            with open(os.path.join(tmp, "provenance", f"{split}.jsonl"), "w") as prov_f:
                rows = []
                for row, prov in _fill(spec, task, split, parts[split], sizes[split], seed, table, used, pool,
                                       progress, stats, taken_hashes):
                    taken.extend(prov.pop("hashes"))
                    rows.append(row)
                    prov_f.write(json.dumps(prov, sort_keys=True) + "\n")
                    if len(rows) >= 64:
                        writer.write_batch(_batch(rows, schema))
                        rows = []
                if rows:
                    writer.write_batch(_batch(rows, schema))
            writer.close()
            stats.pop("_shown", None)
            counts[split] = {"requested": sizes[split], "units": len(parts[split]), **dict(stats)}
            if stats["rows"] == 0:
                raise SourceError(f"{task}/{split}: no row could be built from {source} "
                                  f"({len(parts[split])} source units; {_why(stats)})")
        manifest = {"request": request, "counts": counts}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, path)
    finally:
        if pool:
            pool.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "path": path}


def _why(stats: Counter) -> str:
    bad = {k: v for k, v in stats.items() if k != "rows" and v}
    return ", ".join(f"{k}: {v}" for k, v in bad.items()) or "the source has no usable units"


def _batch(rows: list, schema):
    import pyarrow as pa

    return pa.RecordBatch.from_pylist(rows, schema=schema)
