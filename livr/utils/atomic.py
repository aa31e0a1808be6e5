"""Putting a finished file or directory in place atomically, and writes that fail cleanly (light: no torch import,
for the data builders too).

A write that fails for lack of room or a broken disk (ENOSPC, EDQUOT, EIO, EFBIG: a file-size limit, EROFS) removes
its partial file or directory, leaves what was complete before in place and becomes a one-line `WriteError` naming
the path. Other errors pass through unchanged."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}


class WriteError(RuntimeError):
    """A failed write: one line naming the path (`livr.training.lifecycle` appends where the last checkpoint is)."""

    one_line = True


def _errno(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"os error (\d+)", str(e))  # safetensors' SafetensorError: "I/O error: … (os error 28)"
    return int(found.group(1)) if found else None


def write_failed(e: BaseException, path: str) -> WriteError | None:
    """The WriteError for `e` if it is a failed write (or already one), else None."""
    if isinstance(e, WriteError):
        return e
    code = _errno(e)
    if code not in WRITE_ERRNOS:
        return None
    return WriteError(f"could not write {path}: {os.strerror(code)} ({errno.errorcode[code]}); its partial copy was "
                      "removed, what was complete before is kept")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def clean_failure(path: str, *partial: str):
    """Run the block; if it raises, remove the `partial` files/directories and turn a failed write into WriteError."""
    try:
        yield
    except BaseException as e:
        for p in partial:
            _remove(p)
        err = write_failed(e, path)
        if err is None or err is e:
            raise
        raise err from None


def atomic_file(path: str, write) -> None:
    """`write(tmp)` then rename to `path`: `path` is the old file or the complete new one, never partial."""
    tmp = f"{path}.tmp"
    with clean_failure(path, tmp):
        write(tmp)
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yield a temporary directory that replaces `final` only if the block completes (else it is removed)."""
    parent = os.path.dirname(os.path.abspath(final))
    with clean_failure(final):
        os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.tmp-{uuid.uuid4().hex[:8]}")
    with clean_failure(final, tmp):
        os.makedirs(tmp)
        yield tmp
        replace_dir(tmp, final)


def replace_dir(tmp: str, final: str) -> None:
    """Move the complete directory `tmp` to `final` (same filesystem), replacing what is there: the old copy is
    moved aside first and removed only after the swap, so `final` is always absent, old or new, never partial."""
    old = None
    if os.path.exists(final):
        old = f"{tmp}.old"
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
