"""Shared test set-up: offline, quiet, everything written under pytest's tmp dirs."""
import os
import queue
import signal
import subprocess
import sys
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LIVR_QUIET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@pytest.fixture(scope="session")
def backbone_cache(tmp_path_factory):
    """One directory where each tiny preset is materialised once per test session."""
    return str(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def zero3_json(tmp_path, offload: bool = False) -> str:
    """A ZeRO-3 JSON (as shipped, `zero3_offload.json` with `offload`) that really partitions a tiny model."""
    import json

    with open(os.path.join(ROOT, "deepspeed_configs", f"{'zero3_offload' if offload else 'zero3'}.json")) as f:
        ds = json.load(f)  # (offload: no optimizer in it; livr runs DeepSpeed's CPU Adam there)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    path = tmp_path / ("zero3_offload_test.json" if offload else "zero3_test.json")
    path.write_text(json.dumps(ds))
    return str(path)


def tiny_overrides(backbone_cache: str, data_cache: str, tmp_path, **extra) -> list[str]:
    """key=value overrides for a fast tiny run writing only under tmp dirs."""
    base = {
        "model.cache_dir": backbone_cache, "data.cache_dir": data_cache, "output_dir": str(tmp_path / "runs"),
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", "tracking.artifact_location": str(tmp_path / "artifacts"),
        "data.train_size": 16, "data.val_size": 8, "data.test_size": 8, "train.micro_batch_size": 4,
        "train.grad_accum": 1, "latents.num_latents": 4, "lora.r": 4, "train.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def livr_train(overrides: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`livr train` as a user runs it: one process, no launcher, no RANK/WORLD_SIZE in the environment."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "livr.cli", "train", "--config", os.path.join(ROOT, "configs/demo.yaml"),
                           *overrides], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)


def livr_train_whole_and_cut(overrides: list[str], fail_at: int, tmp_path) -> tuple[subprocess.CompletedProcess, ...]:
    """(whole, cut, again): `livr train` uninterrupted (name=whole), and the same run killed after step `fail_at`
    (name=cut, LIVR_FAIL_AT_STEP) then launched again. The uninterrupted process runs alongside the other two (on
    its own MLflow store), one torch thread each (all three alike), so that two processes share the two cores
    without oversubscribing them; each is still one plain `livr train` process."""
    from concurrent.futures import ThreadPoolExecutor

    one = {"OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(livr_train, overrides + ["name=whole", f"tracking.uri=sqlite:///{tmp_path}/mlflow-whole.db"],
                            one)
        cut = livr_train(overrides + ["name=cut"], {**one, "LIVR_FAIL_AT_STEP": str(fail_at)})
        again = livr_train(overrides + ["name=cut"], one)
        return whole.result(), cut, again


class StockTransformers:
    """`tests/stock_answers.py --serve` with an empty PYTHONPATH and cwd=/: an interpreter that never imports livr and
    pays the torch + transformers import once per session; each spec is answered in a fresh child forked from it."""

    def __init__(self, work: str):
        self.work = work
        self.proc = None

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": "", "HF_MODULES_CACHE": os.path.join(self.work, "modules")}
        self.stderr_path = os.path.join(self.work, f"server-{len(os.listdir(self.work))}.stderr")
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "stock_answers.py"), "--serve"],
                                         cwd="/", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, start_new_session=True)
        self.lines = queue.Queue()

        def pump(out, lines):
            for line in out:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout, self.lines), daemon=True).start()

    def run(self, spec_path: str, timeout: float = 300) -> tuple[int, list[str], str]:
        """(the child's exit code, its stdout lines, its stderr and the server's)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(spec_path + "\n")
        self.proc.stdin.flush()
        out, rc = [], None
        try:
            while rc is None:
                line = self.lines.get(timeout=timeout)
                if line is None:
                    rc = -999  # the server itself died: its children go with it
                    self.close(kill=True)
                elif line.startswith("stock done: "):
                    rc = int(line[len("stock done: "):])
                else:
                    out.append(line)
        except queue.Empty:
            self.close(kill=True)
            rc = -998
            out.append(f"no answer in {timeout} s: the stock server was killed")
        err = ""
        for path in (os.path.join(os.path.dirname(spec_path), "stderr.txt"), self.stderr_path):
            if os.path.exists(path):
                with open(path) as f:
                    err += f.read()
        return rc, out, err

    def run_code(self, code: str, work: str, timeout: float = 300) -> tuple[int, list[str], str]:
        """`code` run as `python -c CODE` would, in a child of the server (work: a fresh directory for its spec)."""
        import json

        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, "spec.json"), "w") as f:
            json.dump({"code": code}, f)
        return self.run(os.path.join(work, "spec.json"), timeout)

    def close(self, kill: bool = False) -> None:
        """Ends the server (stdin closed: it exits after its current child), killed with its children after 30 s or
        at once with `kill`."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            proc.stdin.close()
            proc.wait(timeout=0 if kill else 30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if kill or proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


@pytest.fixture(scope="session")
def stock_transformers(tmp_path_factory):
    """The session's stock-transformers server (tests/stock_answers.py); shut down at the end of the session."""
    server = StockTransformers(str(tmp_path_factory.mktemp("stock")))
    server._start()  # (its imports run while the first test exports)
    try:
        yield server
    finally:
        server.close()
