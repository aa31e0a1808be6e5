"""How a training run ends when it does not finish: a signal or a crash.

SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption, `kill`) do not tear the run down mid-step: the loop
finishes the optimizer step it is in, writes the resumable checkpoint, ends the MLflow run as KILLED, prints
how to resume and raises `RunStopped` (the CLI exits with 128 + the signal number). A second signal aborts at
once. A crash ends the MLflow run as FAILED and prints where the last checkpoint is. Signal handlers can only
be installed in a process's main thread: under Ray Train (whose training function runs in a worker thread)
the driver handles signals instead.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(KeyboardInterrupt):
    """The run stopped on a signal after writing its checkpoint (a KeyboardInterrupt: not an error)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Lifecycle:
    """Holds the run's tracker, its engine and the signal received, if any; one per `train_worker` call."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.tracker = None
        self.engine = None  # released when the run ends, however it ends (`release`)
        self.rank = 0
        self.started = False  # the run got as far as its training loop (earlier errors are config/data errors)
        self.signum: int | None = None
        self._old: dict = {}

    def install(self) -> None:
        self.started = True
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._old[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def release(self) -> None:
        """The signal handlers put back and the engine released: a DeepSpeed engine is not garbage-collected on
        its own (its gradient hooks close a cycle through autograd's C++ state), so without this the model and
        its optimizer state outlive the run in this process — on a GPU, under the next run in the same process
        (`livr demo`, a script or notebook that trains twice)."""
        self.restore()
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.close()
            except Exception as e:  # noqa: BLE001 - in a `finally`: never hides the error that ended the run
                print(f"livr: warning: releasing the training engine failed: {type(e).__name__}: {e}", file=sys.stderr)

    @property
    def installed(self) -> bool:
        return bool(self._old)

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop now, without a checkpoint
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
        self.signum = signum
        if self.rank == 0:
            print(f"[livr] {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                  "(send it again to abort at once)", file=sys.stderr, flush=True)

    def stop_requested(self, sum_across) -> bool:
        """True on every rank once any rank got a signal (`sum_across(value)` sums a float over the ranks)."""
        if not self.installed:
            return False
        return sum_across(1.0 if self.signum is not None else 0.0) > 0

    def resume_hint(self) -> str:
        return f"resume with: livr train --config {os.path.join(self.run_dir, 'config.yaml')}"

    def stopped(self, global_step: int) -> RunStopped:
        """End the MLflow run as KILLED and return the exception to raise (the checkpoint is written)."""
        signum = self.signum or signal.SIGINT
        self.end("KILLED")
        msg = (f"[livr] stopped by {signal.Signals(signum).name} at global step {global_step}; checkpoint "
               f"{os.path.join(self.run_dir, 'checkpoints', 'last')}; {self.resume_hint()}")
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)
        return RunStopped(signum, msg)

    def failed(self, error: BaseException) -> None:
        """A crash: the MLflow run ends FAILED. An abort by a second signal, or a stop asked for by the caller
        (Ray Tune stops an ASHA-pruned trial with `sys.exit(0)` inside `tune.report`), ends it KILLED."""
        stopped = isinstance(error, KeyboardInterrupt) or (isinstance(error, SystemExit) and not error.code)
        self.end("KILLED" if stopped else "FAILED")
        if not self.started or self.rank != 0:
            return
        step = _checkpoint_step(os.path.join(self.run_dir, "checkpoints", "last"))
        where = f"the last checkpoint is at global step {step}" if step is not None else "no checkpoint yet"
        if getattr(error, "one_line", False) and error.args:  # its own one-line message says where, no second line
            error.args = (f"{error.args[0]}; {where}; {self.resume_hint()}", *error.args[1:])
            return
        print(f"[livr] run {'stopped' if stopped else 'failed'} ({type(error).__name__}); "
              f"{where}; {self.resume_hint()}", file=sys.stderr, flush=True)

    def end(self, status: str) -> None:
        if self.tracker is not None:
            try:
                self.tracker.end(status)
            except Exception as e:  # noqa: BLE001 - the tracking server must never mask the run's own outcome
                print(f"[livr] tracking: could not mark the run {status} ({type(e).__name__})", file=sys.stderr)
            self.tracker = None


def _checkpoint_step(path: str) -> int | None:
    try:
        with open(os.path.join(path, "state.json")) as f:
            return int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

