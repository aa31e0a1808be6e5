"""One live run per run directory (`run_lock`), and the check that a resumed run is the same run (`check_same_run`).

The lock is `<run_dir>/.lock`, a `filelock.FileLock` (fcntl.flock), plus `<run_dir>/.lock.json` naming its holder
(host, pid, start time, command). A second launch of a live run is a one-line ConfigError, raised before anything
is loaded or written. A requeue after the holder died resumes: the kernel releases a flock when its process dies
(kill -9, OOM), so the lock is free again and the leftover .lock.json is stale and replaced. Where the filesystem
has no flock at all, filelock falls back to a marker file whose dead owner (pid, host, start) it detects itself.
Where flock "succeeds" without excluding anyone (NFS mounted with local_lock=flock), .lock.json is the fallback:
a holder on this host whose process is still alive (same pid and process start time) refuses the launch. A holder
on another host cannot be checked from here: on such filesystems use NFSv4 locks, or keep runs on one node.

Who takes it: the process that owns the run. `train_worker` when it runs alone (single process: called without a
`report` callback), the driver (`run_distributed`) under Ray Train, the trial body for a Tune trial. While held,
LIVR_RUN_LOCK_HELD=<run_dir> is set in the holder's environment (Ray passes it on to the workers it starts):
`run_lock` on that same directory is then a no-op, since the holder's process tree is that run.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import time
import unicodedata
from contextlib import contextmanager

from livr.config import Config, ConfigError, flatten, from_dict, looks_like_path, to_dict

HELD_ENV = "LIVR_RUN_LOCK_HELD"


def ray_safe_name(name: str) -> str:
    """An ASCII form of a run name for Ray (run names and storage paths; a non-ASCII one fails there with
    "'ascii' codec can't encode"): an ASCII name of [A-Za-z0-9._-] is returned unchanged; otherwise accents are
    folded (NFKD), anything else becomes '_', and '-<8 hex of sha1(name)>' is appended, so that two names that fold
    alike stay apart: 'café' -> 'cafe-<hash>', '模型' -> 'run-<hash>'."""
    if re.fullmatch(r"[A-Za-z0-9._-]+", name):
        return name
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", folded).strip("_").lstrip(".")
    return f"{safe or 'run'}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"


def _canonical(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process from Linux /proc, or None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive_here(holder: dict) -> bool:
    """True if `holder` is a live process on this host other than this one: a zombie (killed, not yet reaped) is
    dead, and a reused pid is told apart by the process start time."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (not Linux): os.kill said it exists
        return True
    return stat[0] not in ("Z", "X") and holder.get("proc_start") in (None, stat[1])


def read_holder(run_dir: str) -> dict | None:
    """The holder record of `<run_dir>/.lock.json`, or None (absent or unreadable)."""
    try:
        with open(os.path.join(run_dir, ".lock.json")) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def _busy(run_dir: str, holder: dict | None) -> ConfigError:
    name = os.path.basename(os.path.normpath(run_dir))
    who = (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}" if holder
           else "another process")
    return ConfigError(f"config: name={name!r}: {run_dir} is being trained by {who}; wait for it, or use another name=")


def _write_holder(run_dir: str) -> dict:
    stat = _proc_stat(os.getpid())
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": stat and stat[1],
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
    path = os.path.join(run_dir, ".lock.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(holder, f)
    os.replace(tmp, path)
    return holder


def lock_held(run_dir: str) -> bool:
    """True if this process, or the owner that started it (LIVR_RUN_LOCK_HELD), holds `run_dir`'s lock."""
    return os.environ.get(HELD_ENV) == _canonical(run_dir)


@contextmanager
def run_lock(run_dir: str):
    """Hold the run directory's lock for the block (the directory is created if needed, and removed again if the
    block left nothing in it); released on exit, exceptions included. A live holder elsewhere: a ConfigError naming
    its pid, host and start time, and nothing in run_dir is changed."""
    from filelock import FileLock, Timeout

    canonical = _canonical(run_dir)
    if lock_held(canonical):  # this process (tree) already owns the run
        yield
        return
    created = not os.path.isdir(canonical)
    top = canonical  # the outermost directory this call creates (runs/ itself on a first launch)
    while created and not os.path.isdir(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    os.makedirs(canonical, exist_ok=True)
    lock = FileLock(os.path.join(canonical, ".lock"))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise _busy(run_dir, read_holder(canonical)) from None
    previous, mine = os.environ.get(HELD_ENV), None
    try:
        holder = read_holder(canonical)
        if holder and _alive_here(holder):  # flock did not exclude a live holder (NFS local_lock): trust the record
            raise _busy(run_dir, holder)
        mine = _write_holder(canonical)
        os.environ[HELD_ENV] = canonical
        yield
    finally:
        if previous is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = previous
        _let_go(canonical, mine, created)
        lock.release()
        if created:  # only if the block wrote nothing (e.g. a config or data error before the run began)
            d = canonical
            while True:
                try:
                    os.rmdir(d)
                except OSError:
                    break
                if d == top:
                    break
                d = os.path.dirname(d)


def _let_go(run_dir: str, mine: dict | None, created: bool) -> None:
    """Before unlocking: remove our holder record, and the lock file itself from a directory we created that
    stayed empty (a waiter that opened it re-checks the file after locking)."""
    if mine and (read_holder(run_dir) or {}).get("pid") == mine["pid"]:
        os.remove(os.path.join(run_dir, ".lock.json"))
    if created and os.listdir(run_dir) == [".lock"]:
        os.remove(os.path.join(run_dir, ".lock"))


# ----------------------------------------------------------------------------- the same run
# Keys that do not change the trained weights: where and how the run executes, what is logged and evaluated.
# Everything else defines the run. The run's location (output_dir, name) is the directory being resumed itself.
EXECUTION_KEYS = ("name", "output_dir", "tracking.", "eval.", "tune.", "train.resume", "train.log_every",
                  "model.device", "model.cache_dir", "model.attn_implementation", "model.gradient_checkpointing",
                  "data.num_workers", "data.cache_mib", "data.cache_dir", "data.test_source", "data.test_split",
                  "data.test_size", "distributed.")
DEFINING_EXCEPTIONS = ("distributed.deepspeed",)  # the engine's checkpoint layout: plain torch and ZeRO differ
PATH_KEYS = ("model.backbone", "data.source", "distributed.deepspeed")


def _norm_path(key: str, value: str) -> str:
    """A path value resolved (~, relative to the working directory, symlinks); presets, hub ids and the data
    sources 'synthetic' / 'hub' unchanged."""
    if not value or value in ("synthetic", "hub"):
        return value
    local = os.path.expanduser(value)
    if key == "model.backbone" and not os.path.exists(local) and not looks_like_path(value):
        return value  # a preset name or hub id
    return _canonical(local)


def run_settings(cfg: Config) -> dict:
    """The settings that define a run (see EXECUTION_KEYS), paths resolved: equal for the same run however its
    paths are spelled (relative here, absolute under Ray) and whatever the execution mode."""
    flat = flatten(to_dict(cfg))
    out = {k: v for k, v in flat.items() if not k.startswith(EXECUTION_KEYS) or k in DEFINING_EXCEPTIONS}
    return {k: _norm_path(k, v) if k in PATH_KEYS else v for k, v in out.items()}


def check_same_run(cfg: Config, saved_path: str) -> None:
    """Resuming a run directory whose saved config defines a different run would mix two runs: a one-line
    ConfigError naming the first differing key. Only the settings that change the trained weights are compared
    (`run_settings`): model (backbone, dtype, depth, remote code), latents, lora, data (tasks, source, train/val
    splits and sizes, image size, answer format, seed, options, pixel limits), train (mode, epochs/steps, batch,
    accumulation, clipping, selection, seed), optim, and the DeepSpeed config. Paths compare resolved."""
    import yaml

    if not os.path.exists(saved_path):
        return
    try:
        with open(saved_path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError("not a mapping")
        saved_cfg = from_dict(data)
    except (yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"config: {saved_path} (the run's saved config) cannot be read: {str(e).splitlines()[0]}; "
                          "use another name=, or train.resume=false to start it again from zero") from None
    saved, now = run_settings(saved_cfg), run_settings(cfg)
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise ConfigError(f"config: {cfg.run_dir} holds a run with a different config ({k}: {saved.get(k)!r} there, "
                          f"{now[k]!r} now); use another name=, or train.resume=false to start it again from zero")


def check_resume(cfg: Config) -> None:
    """`check_same_run` against `<run_dir>/config.yaml` when this launch would resume (train.resume and a
    checkpoint in the run directory): the check a Ray driver runs before any worker starts."""
    if cfg.train.resume and os.path.exists(os.path.join(cfg.run_dir, "checkpoints", "last")):
        check_same_run(cfg, os.path.join(cfg.run_dir, "config.yaml"))
