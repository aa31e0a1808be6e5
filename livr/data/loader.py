"""The streaming data path: rows stay in memory-mapped Arrow tables, each rank encodes only its own micro-batches.

- `Rows`: a split as a lazy sequence over one `datasets.Dataset` per task. `rows[i]` decodes one row (its
  images included); `rows.column(name)` reads a text column without touching an image. The Arrow files are
  memory-mapped, so every rank of a node shares them through the page cache.
- `EncodedRows`: a torch `Dataset` that encodes row i on demand (`SequenceBuilder.encode`), in DataLoader
  worker processes. A bad row becomes the same one-line `DataError` in the main process (never a worker
  traceback).
- `micro_batches`: the exact sequence of this rank's micro-batches for one stage, from any step on: epoch e's
  order is `randperm(n, seed*1000 + stage*100 + e)` on every rank, global batch k is order[k*G:(k+1)*G], and
  micro-batch a of rank r is its slice (a*world + r)*mb … — so N ranks × micro-batch b see exactly what one
  rank with accumulation N sees, and a resume continues at the same row.
- `make_loader`: a DataLoader with `collate` as collate_fn, `data.num_workers` workers (-1: one per spare
  core), prefetching, persistent workers and pinned memory on GPU.
"""
from __future__ import annotations

import atexit
import bisect
import multiprocessing.util  # noqa: F401  (registers its exit hook first: see _stop_workers_at_exit)
import os
import re
import signal
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from livr.data.images import image_problem, refuse_bombs
from livr.data.sequence import collate
from livr.data.tasks import DataError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # worker processes fork after the tokenizer ran


class Rows(Sequence):
    """Rows of several `datasets.Dataset`s (or lists) as one sequence, decoded only when indexed."""

    def __init__(self, parts: list | None = None):
        self.parts = [p for p in parts or [] if len(p)]
        self._ends = []
        n = 0
        for p in self.parts:
            n += len(p)
            self._ends.append(n)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            if i.step not in (None, 1):
                return Rows([[self[j] for j in range(*i.indices(len(self)))]])
            return self._range(*i.indices(len(self))[:2])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        p = bisect.bisect_right(self._ends, i)
        return self.parts[p][i - (self._ends[p - 1] if p else 0)]

    def _range(self, start: int, stop: int) -> Rows:
        out, offset = [], 0
        for p in self.parts:
            lo, hi = max(start - offset, 0), min(stop - offset, len(p))
            if lo < hi:
                out.append(p.select(range(lo, hi)) if hasattr(p, "select") else p[lo:hi])
            offset += len(p)
        return Rows(out)

    def describe(self, i: int) -> str:
        """"<task> idx=<idx>" of row i, read without decoding its images (for error messages)."""
        p = bisect.bisect_right(self._ends, i)
        part, j = self.parts[p], i - (self._ends[p - 1] if p else 0)
        meta = part.select_columns([c for c in ("sub_task", "idx") if c in part.column_names])[j] \
            if hasattr(part, "select_columns") else part[j]
        return f"{meta.get('sub_task', '?')} idx={meta.get('idx')}"

    def first_without_image(self) -> int | None:
        """Index of the first row with no image (`image_1` empty), read from the Arrow column's validity (no image
        is decoded); None when every row has one."""
        start = 0
        for p in self.parts:
            if hasattr(p, "data") and "image_1" in getattr(p, "column_names", ()):
                col = p.data.column("image_1")
                if col.null_count:
                    import pyarrow.compute as pc

                    return start + pc.index(pc.is_null(col), True).as_py()
            else:
                for j, r in enumerate(p):
                    if r.get("image_1") is None:
                        return start + j
            start += len(p)
        return None

    def column(self, name: str) -> list:
        """A text column for every row, without decoding any image."""
        out = []
        for p in self.parts:
            out.extend(p[name] if hasattr(p, "column_names") else [r.get(name) for r in p])
        return out


def column(rows, name: str) -> list:
    """`rows.column(name)` for `Rows`, else read from each row (plain lists of dicts)."""
    return rows.column(name) if hasattr(rows, "column") else [r.get(name) for r in rows]


META = ("idx", "sub_task", "answer", "choices")  # what scoring needs of a row, without its images


class EncodedRows(Dataset):
    """Row i encoded by `builder` on demand (answers included for training, prompts only for generation).

    Encoded rows are kept, first come first kept, up to `cache_bytes` per process (each loader worker has its
    own): small data (the demo's 56-px rows) is encoded once per worker and reused every epoch, while 1000-px
    rows (~18 MiB of pixel_values per image) quickly exhaust the budget and are simply encoded again."""

    def __init__(self, rows, builder, with_answer: bool = True, cache_bytes: int = 0, split: str = ""):
        self.rows, self.builder, self.with_answer, self.split = rows, builder, with_answer, split
        self.cache_bytes, self._cache, self._cached = cache_bytes, {}, 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if i in self._cache:
            item = self._cache[i]
            return {**item, "meta": dict(item["meta"])}  # collate_rows pops "meta": never hand out the cached dict
        item = self._encode(i)
        size = sum(v.numel() * v.element_size() for v in item.values() if torch.is_tensor(v))
        if "_error" not in item and self._cached + size <= self.cache_bytes:
            self._cache[i], self._cached = item, self._cached + size
            return {**item, "meta": dict(item["meta"])}
        return item

    def _encode(self, i: int) -> dict:
        try:
            try:
                with refuse_bombs():  # decodes the row's images; a bomb is refused from its header
                    row = self.rows[i]
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a truncated or corrupt file
                where = self.rows.describe(i) if hasattr(self.rows, "describe") else f"row {i}"
                raise DataError(f"{where}: its image(s) {image_problem(e)}") from None
            item = self.builder.encode(row, with_answer=self.with_answer)
        except DataError as e:  # carried to the main process as a value: one line there, not a worker traceback
            msg = str(e)  # "<task> idx=<idx>: …" names the split too
            return {"_error": re.sub(r"^(\S+) idx=", rf"\1/{self.split} idx=", msg, count=1) if self.split else msg}
        item["meta"] = {k: row.get(k) for k in META}
        return item


def collate_rows(items: list[dict], pad_id: int, padding_side: str = "right", pack: int = 0) -> dict:
    """`collate` for `EncodedRows` items; row metadata rides along as a list; a bad row's error is kept.
    `pack` > 0: one optimizer step's items packed into rows of at most `pack` tokens, {"packed": [micro-batches]}
    (livr/data/packing.py)."""
    errors = [it["_error"] for it in items if "_error" in it]
    if errors:
        return {"_error": errors[0]}
    meta = [it.pop("meta") for it in items]
    if pack:
        from livr.data.packing import collate_packed

        packed = collate_packed(items, pad_id, pack)
        packed[0]["meta"] = meta  # the step's rows (named in logs), carried by its first packed micro-batch
        return {"packed": packed, "meta": meta}
    batch = collate(items, pad_id, padding_side)
    batch["meta"] = meta
    return batch


def checked(batch: dict) -> dict:
    """Raise a bad row's DataError in the calling (main) process."""
    if "_error" in batch:
        raise DataError(batch["_error"])
    return batch


def micro_batches(n_rows: int, *, seed: int, stage: int, start_step: int, steps: int, micro_batch: int,
                  accum: int, world: int, rank: int) -> Iterator[list[int]]:
    """This rank's micro-batches (row indices) for optimizer steps start_step … steps-1 of a stage."""
    global_batch = micro_batch * accum * world
    per_epoch = max(1, n_rows // global_batch)
    order, order_epoch = None, None
    for step in range(start_step, steps):
        epoch, k = divmod(step, per_epoch)
        if epoch != order_epoch:
            gen = torch.Generator().manual_seed(seed * 1000 + stage * 100 + epoch)
            order, order_epoch = torch.randperm(n_rows, generator=gen).tolist(), epoch  # the same on every rank
        chunk = order[k * global_batch : (k + 1) * global_batch]
        for a in range(accum):
            j = a * world + rank
            yield chunk[j * micro_batch : (j + 1) * micro_batch]


def auto_workers(configured: int, local_world: int = 1) -> int:
    """-1: one loader process per core this rank can spare (at most 4), 0 on a single core."""
    if configured >= 0:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, local_world) - 1))


def make_loader(dataset: EncodedRows, batches, pad_id: int, *, num_workers: int, pin_memory: bool = False,
                padding_side: str = "right", prefetch_factor: int = 2, persistent: bool = False,
                pack: int = 0) -> DataLoader:
    """A DataLoader over `batches` (an iterable of index lists) of `dataset`, collated with `collate_rows`.
    `persistent`: the workers (and their encoded-row caches) live as long as the loader, over many passes."""
    kw = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent} if num_workers > 0 else {}
    # its own generator: making an iterator then draws no number from the global torch RNG (dropout's), so
    # the number of loaders created (e.g. once more after a resume) never shifts the training randomness
    return _Loader(dataset, batch_sampler=list(batches) if not isinstance(batches, list) else batches,
                   num_workers=num_workers, collate_fn=_Collate(pad_id, padding_side, pack), pin_memory=pin_memory,
                   generator=torch.Generator().manual_seed(0), worker_init_fn=_leave_signals_to_main, **kw)


_ITERATORS: weakref.WeakSet = weakref.WeakSet()  # live multi-process iterators of this process


class _Loader(DataLoader):
    def _get_iterator(self):
        it = super()._get_iterator()
        if self.num_workers > 0:
            _ITERATORS.add(it)
        return it


def shutdown_loaders() -> None:
    """Stop the workers of every live loader of this process. They ignore SIGINT/SIGTERM, so a run that
    ends by an exception (whose traceback keeps its loaders alive past interpreter exit, where
    multiprocessing joins its children) must stop them itself."""
    for it in list(_ITERATORS):
        it._shutdown_workers()  # tells them to exit and joins them (torch terminates a stuck one)
        for w in getattr(it, "_workers", []):
            if w.is_alive():
                w.kill()


def _ignores_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(mask >> (signal.SIGTERM - 1) & 1)


def _stop_workers_at_exit() -> None:
    """Interpreter exit: multiprocessing's own exit hook SIGTERMs daemonic children and then joins them, but loader
    workers ignore SIGTERM, so one still alive at exit (a loader kept by a fixture or a traceback, or one livr does
    not track) would block the exit forever (seen in CI: the suite passed, then pytest never exited). This hook
    runs before that one (atexit is LIFO: multiprocessing.util registers its hook when imported, above) and kills
    the daemonic children that would not heed its SIGTERM."""
    import multiprocessing

    shutdown_loaders()
    stuck = [p for p in multiprocessing.active_children() if p.daemon and _ignores_sigterm(p.pid)]
    if stuck:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise "worker killed" at exit
    for p in stuck:
        p.kill()
        p.join(5)


atexit.register(_stop_workers_at_exit)


def _leave_signals_to_main(_worker_id: int) -> None:
    """Ctrl-C and a scheduler's SIGTERM reach the whole process group: the workers ignore them and the main
    process stops the run cleanly (`livr.training.lifecycle`); they still exit when the main process dies."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class _Collate:  # a picklable collate_fn (spawned workers)
    def __init__(self, pad_id: int, padding_side: str, pack: int = 0):
        self.pad_id, self.padding_side, self.pack = pad_id, padding_side, pack

    def __call__(self, items: list[dict]) -> dict:
        return collate_rows(items, self.pad_id, self.padding_side, self.pack)
