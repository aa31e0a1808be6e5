"""The tracker's send path: a bounded in-memory queue, one background sender thread, a JSONL buffer file.

Each logging call becomes an *op* (a JSON-able dict with a `run` id and an `op` kind: metrics, params,
artifact, status, running). `Outbox.put` never touches the network: it appends the op to memory, or, while
the server is unreachable (or memory holds `MAX_MEMORY_OPS`), to `<run_dir>/tracking_buffer.jsonl`. The
sender thread sends ops in order (consecutive metric ops as one batch). `tracking_buffer.jsonl.sent` holds the
byte offset up to which the file has landed, so a replay (in this process or the next one) does not re-send
it; a batch whose answer was lost is re-sent with its original timestamps, which MLflow's SQL stores
de-duplicate. What is unsent when `close` gives up stays in the file for the next `Outbox` on that run dir.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import deque

BUFFER_NAME = "tracking_buffer.jsonl"
MAX_MEMORY_OPS = 2000  # ops held in memory while the server answers; beyond it they go to the buffer file
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
RETRY_S = (0.5, 5.0)  # first and longest pause between tries while the server is unreachable


class _QuietSender(logging.Filter):
    """urllib3 logs a warning for each retry; an outage is reported once, by the Outbox, not per request."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != "livr-tracking"


logging.getLogger("urllib3.connectionpool").addFilter(_QuietSender())


def say(msg: str) -> None:
    print(f"[livr] tracking: {msg}", file=sys.stderr, flush=True)


def reason(e: BaseException) -> str:
    """The innermost network error's class name (MLflow wraps requests errors in MlflowException)."""
    seen = e
    while seen is not None:
        name = type(seen).__name__
        if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "OperationalError"):
            return name
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    for name in ("ConnectionError", "Connection refused", "timed out", "Max retries exceeded"):
        if name in text:
            return "ConnectionError" if name != "timed out" else "Timeout"
    return type(e).__name__


def is_permanent(e: BaseException) -> bool:
    """A refusal that re-sending cannot fix (a 4xx answer other than 408/429, a missing local file)."""
    if isinstance(e, FileNotFoundError):
        return True
    status = getattr(e, "get_http_status_code", lambda: 500)()
    return 400 <= status < 500 and status not in (408, 429)


class Outbox:
    """Ordered, bounded, outage-proof delivery of ops through `send(list_of_ops)` (which raises on failure)."""

    def __init__(self, send, path: str, label: str):
        self.send, self.path, self.label = send, path, label
        self.mem: deque = deque()  # (op, end offset in the file or None)
        self.cv = threading.Condition()
        self.spilling = os.path.exists(path)  # ops go to the file (and are read back from it) while true
        self.read = self.sent = self._load_sent() if self.spilling else 0
        if self.spilling and self._ends_cut():
            self._append([])  # a line cut by a crash stays a line of its own (skipped when read)
        self.down: str | None = None  # the outage's reason while the server is unreachable
        self.replaying = "resume" if self.spilling else ""  # "outage" after an outage, "resume" for an old file
        self.replayed = self.refused = self.lost = 0
        self.busy = self.stopped = False
        self.thread = threading.Thread(target=self._run, name="livr-tracking", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ caller side (never blocks on the network)
    def put(self, op: dict) -> None:
        with self.cv:
            try:
                if not self.spilling and not self.down and len(self.mem) < MAX_MEMORY_OPS:
                    self.mem.append((op, None))
                else:
                    self._append([op])
            except OSError as e:  # a full disk or a deleted run directory must not stop training either
                self.lost += 1
                if self.lost == 1:
                    say(f"cannot write {self.path} ({e.strerror}); tracking data is being dropped")
            self.cv.notify_all()

    def close(self, timeout: float) -> int:
        """Wait up to `timeout` s for everything to land; stop the sender; return how many ops were left unsent
        (kept in the buffer file)."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while (self.mem or self.spilling or self.busy) and not self.stopped and time.monotonic() < deadline:
                self.cv.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            self.stopped = True
            self.cv.notify_all()
            self._save_memory()
            return self._count_lines(self.sent) if self.spilling else 0

    # ------------------------------------------------------------------ the buffer file
    def _append(self, ops: list) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(op) + "\n" for op in ops) if ops else "\n")
        self.spilling = True

    def _ends_cut(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def _save_memory(self) -> None:
        """Ops that only memory holds go to the front of the file (they are older than anything in it)."""
        if not self.mem or self.mem[0][1] is not None:
            return  # empty, or a window of the file (which still holds it)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(op) + "\n" for op, _ in self.mem))
            if os.path.exists(self.path):  # written while memory was full: nothing of it was read yet
                with open(self.path) as old:
                    shutil.copyfileobj(old, f)
        os.replace(tmp, self.path)
        if os.path.exists(self.path + ".sent"):
            os.remove(self.path + ".sent")
        self.mem.clear()
        self.spilling, self.read, self.sent = True, 0, 0

    def _load_sent(self) -> int:
        try:
            with open(self.path + ".sent") as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _mark_sent(self, offset: int) -> None:
        self.sent = offset
        with open(self.path + ".sent.tmp", "w") as f:
            f.write(str(offset))
        os.replace(self.path + ".sent.tmp", self.path + ".sent")

    def _count_lines(self, offset: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return sum(1 for line in f if line.strip())

    def _read_chunk(self) -> None:
        """Move the next ops of the file into memory; remove the file once everything in it has landed."""
        size = os.path.getsize(self.path)
        if self.read >= size:
            for p in (self.path, self.path + ".sent"):
                if os.path.exists(p):
                    os.remove(p)
            self.spilling, self.read, self.sent = False, 0, 0
            return
        with open(self.path, "rb") as f:
            f.seek(self.read)
            for line in f:
                self.read += len(line)
                try:
                    self.mem.append((json.loads(line), self.read))
                except json.JSONDecodeError:
                    continue  # an empty line, or one cut by a crash
                if len(self.mem) >= MAX_MEMORY_OPS:
                    break

    # ------------------------------------------------------------------ the sender thread
    def _batch(self) -> list:
        first = self.mem[0][0]
        if first["op"] != "metrics":
            return [self.mem[0]]
        batch, n = [], 0
        for item in self.mem:
            op = item[0]
            if op["op"] != "metrics" or op["run"] != first["run"] or (batch and n + len(op["m"]) > MAX_BATCH_METRICS):
                break
            batch.append(item)
            n += len(op["m"])
        return batch

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 - e.g. the run directory deleted under it: report, never raise
            with self.cv:
                self.stopped, self.busy = True, False
                self.cv.notify_all()
                try:
                    self._save_memory()
                except OSError:
                    pass
            say(f"the sender stopped ({type(e).__name__}: {str(e)[:200]}); what is unsent stays in {self.path}")

    def _loop(self) -> None:
        pause = RETRY_S[0]
        while True:
            with self.cv:
                while not self.stopped and not self.mem:
                    if self.spilling and not self.down:
                        self._read_chunk()
                        continue
                    self._report_replayed()
                    self.cv.notify_all()
                    self.cv.wait(pause if self.down else None)
                    if self.down and self.spilling:
                        self._read_chunk()
                if self.stopped:
                    return
                batch, self.busy = self._batch(), True
            error = None
            try:
                self.send([op for op, _ in batch])
            except Exception as e:  # noqa: BLE001 - any failure is either an outage or a refusal, never raised
                error = e
            with self.cv:
                self.busy = False
                if self.stopped:  # close() gave up meanwhile: the file (or the next Outbox) has these ops
                    self.cv.notify_all()
                    return
                if error is None or is_permanent(error):
                    self._done(batch, error)
                    pause = RETRY_S[0]
                else:
                    self._outage(error)
                    self.cv.wait(pause)
                    pause = min(pause * 2, RETRY_S[1])
                self.cv.notify_all()

    def _done(self, batch: list, error) -> None:
        for _ in batch:
            self.mem.popleft()
        if batch[-1][1] is not None:
            self._mark_sent(batch[-1][1])
        if error is not None:
            self.refused += len(batch)
            if self.refused == len(batch):
                say(f"{self.label} refused {batch[0][0]['op']} ({type(error).__name__}: {str(error)[:200]}); "
                     "dropped (later refusals are counted, not printed)")
        if self.down:
            self.down, self.replaying = None, "outage"
        if self.replaying:
            self.replayed += sum(op["op"] == "metrics" for op, _ in batch)

    def _outage(self, error) -> None:
        if self.down:
            return
        self.down = reason(error)
        self._save_memory()  # from now on everything waits on disk: a crash during the outage loses nothing
        say(f"{self.label} unreachable ({self.down}); training continues, metrics buffered to {self.path}")

    def _report_replayed(self) -> None:
        if self.replaying and not self.spilling and not self.down:
            again = "reachable again; replayed" if self.replaying == "outage" else f"replayed from {self.path}:"
            say(f"{self.label} {again} {self.replayed} metric batches")
            self.replaying, self.replayed = "", 0


# ---------------------------------------------------------------------- one Outbox per run directory and process
_OPEN: dict[str, Outbox] = {}
_OPEN_LOCK = threading.Lock()


def outbox_for(run_dir: str, send, label: str) -> Outbox:
    """The open Outbox of `run_dir` in this process (several Trackers on one run share it), else a new one."""
    path = os.path.join(os.path.abspath(run_dir), BUFFER_NAME)
    with _OPEN_LOCK:
        box = _OPEN.get(path)
        if box is None or box.stopped:
            box = _OPEN[path] = Outbox(send, path, label)
        return box


@atexit.register
def _close_all() -> None:
    """At interpreter exit: a short last chance to send, then whatever is unsent goes to the buffer files."""
    for box in list(_OPEN.values()):
        if not box.stopped:
            try:
                left = box.close(0.0 if box.down else 5.0)
            except OSError:
                continue
            if left:
                say(f"{left} unsent items kept in {box.path}; they are sent when this run resumes")
