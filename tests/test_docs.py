"""The docs, executed (issue 31). Every fenced block of README.md and docs/*.md names its language; every shell block
says where it runs, `<!-- docs-test: KIND (why) -->` on the line above its fence (KINDS). The `cpu` blocks run here
as written, in order (docs/quickstart.md first, as a newcomer would, then README.md, then docs/), from a directory
holding the repository's configs; this test only appends tiny sizes (TINY, `_tiny_args`), puts `/tmp/...` paths
under its own tmp dir, and points a run directory a command names but no earlier command made (`runs/demo-livr`)
at the first run. Every other block's livr commands parse and their configs resolve."""
import os
import re
import shlex
import time

import pytest
from conftest import tiny_overrides

from livr.cli import main
from livr.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
KINDS = {
    "cpu": "runs on a CPU in seconds: executed by test_docs_cpu_blocks_run_as_written",
    "slow": "runs on a CPU in minutes (the demo, Ray Train / Tune runs, GB-sized checkpoints): parsed here",
    "gpu": "needs a GPU", "cluster": "needs a Ray / Kubernetes cluster", "server": "starts or needs a server",
    "data": "needs downloaded source data or your own checkpoint", "hub": "downloads from the Hugging Face hub",
    "install": "installs from package indexes",
}
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?:<!-- docs-test: (?P<kind>\w+)[^>]*-->\n)?```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
QUIET_ENV = ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX")


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def blocks() -> list[tuple[str, int, str | None, str, str]]:
    """(file, line, kind or None, info string, body) of every fenced block of README.md and docs/*.md."""
    out = []
    for rel in DOCS:
        text = _read(rel)
        for m in FENCE.finditer(text):
            line = text[:m.start()].count("\n") + 1 + (1 if m.group("kind") else 0)
            out.append((rel, line, m.group("kind"), m.group("info").strip(), m.group("body")))
    return out


def _commands(block: str) -> list[str]:
    """The `livr ...` command lines of a fenced block: continuation lines joined, the comment and leading VAR=value
    assignments dropped, optional `[--flag ...]` groups removed."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        line = re.sub(r"^(?:[A-Z_]+=\S*\s+)+", "", line)
        if line.startswith("livr ") and not line.startswith("livr verify:"):
            out.append(re.sub(r"\s\[--[^\]]*\]", "", line))
    return out


def test_every_shell_block_says_where_it_runs():
    """A fenced block without a language, or a shell block without a known `docs-test` kind, fails here; so does a
    `cpu` block holding anything but livr commands (it would not all be executed)."""
    found, problems = 0, []
    for rel, line, kind, info, body in blocks():
        found += 1
        if not info:
            problems.append(f"{rel}:{line}: a fence without a language (```text for output)")
        elif info in SHELL and kind not in KINDS:
            problems.append(f"{rel}:{line}: no <!-- docs-test: KIND --> above it ({kind or 'none'}; KIND in {sorted(KINDS)})")
        elif kind == "cpu":
            lines = [ln for ln in body.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            if len(_commands(body)) != len(lines) or info not in SHELL:
                problems.append(f"{rel}:{line}: a cpu block must hold only livr commands")
    for rel in DOCS:  # an indented (unfenced) command block would escape all of this
        for m in re.finditer(r"\n\n((?: {4}|\t)(?:livr|python|bash|source|pip) [^\n]*)", FENCE.sub("", _read(rel))):
            problems.append(f"{rel}: an indented command block ({m.group(1).strip()[:40]}): fence and mark it")
    assert found > 40 and not problems, problems


def test_every_documented_livr_command_parses_and_its_config_resolves(monkeypatch):
    """A documented command whose flags or config keys stop existing fails here: each one parses with livr's CLI, and
    where it names a config in the repository, that config with its overrides resolves (placeholders such as RUN,
    DIR, $VAR and configs written by earlier commands are parsed only)."""
    from livr.cli import build_parser

    monkeypatch.chdir(ROOT)
    commands = [(rel, c) for rel, _, _, _, body in blocks() for c in _commands(body)]
    assert len(commands) > 40
    resolved = 0
    for rel, line in commands:
        argv = shlex.split(line)[1:]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            raise AssertionError(f"{rel}: `{line}` does not parse") from None
        config = getattr(args, "config", None)
        if "$" in line or not hasattr(args, "overrides") or (config and not os.path.isfile(config)):
            continue
        try:
            load_config(config, args.overrides)
        except ConfigError as e:
            raise AssertionError(f"{rel}: `{line}`: {e}") from None
        resolved += 1
    assert resolved > 20


def cpu_commands() -> list[tuple[str, str]]:
    """(file, command) of the `cpu` blocks, in the order a newcomer meets them: the quick start first."""
    order = ["docs/quickstart.md"] + [d for d in DOCS if d != "docs/quickstart.md"]
    found = [(rel, c) for rel, _, kind, _, body in blocks() if kind == "cpu" for c in _commands(body)]
    return sorted(found, key=lambda rc: order.index(rc[0]))


def _tiny_args(argv: list[str], tiny: list[str]) -> list[str]:
    """What this test appends to a documented command: tiny sizes, never a change of what the command does."""
    if argv[0] in ("train", "verify"):
        return tiny
    if argv[0] == "inspect":
        return ["--limit", "2", "--seeds", "1"] if "--causal" in argv else ["--limit", "4", "--heatmaps", "1"]
    if argv[:2] == ["data", "make-synthetic"]:
        return ["--train", "8", "--val", "4", "--test", "4", "--image-size", "56"]
    return []


def _placed(argv: list[str], tmp_path, first_run) -> list[str]:
    """/tmp/X -> <tmp>/tmp/X; a run directory `runs/NAME` that no earlier command made -> a link to the first run."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("/tmp/"):
            a = str(tmp_path / "tmp" / a[len("/tmp/"):])
            os.makedirs(os.path.dirname(a), exist_ok=True)
        elif (a.startswith("runs/") and (i and argv[i - 1] == "--run" or argv[0] == "report") and first_run
              and not os.path.exists(a)):
            os.symlink(first_run, a)
        out.append(a)
    return out


@pytest.mark.slow
def test_docs_cpu_blocks_run_as_written(backbone_cache, data_cache, tmp_path, monkeypatch, capsys):
    """Each command of every `cpu` block runs and exits 0. The first `livr train` (docs/quickstart.md's) runs as its
    own process logged to a file, as a newcomer's would: no progress-bar escape codes, one line per epoch with loss
    and validation accuracy, no known noise, and at the end the run directory and the MLflow run."""
    import subprocess
    import sys

    commands = cpu_commands()
    assert commands[0][0] == "docs/quickstart.md" and {rel for rel, _ in commands} >= {"README.md", "docs/insight.md"}
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    os.symlink(os.path.join(ROOT, "deepspeed_configs"), tmp_path / "deepspeed_configs")
    monkeypatch.chdir(tmp_path)
    for key in QUIET_ENV:
        monkeypatch.setenv(key, "1")  # (restored after: livr.utils.console sets them in this process)
    tiny = tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "output_dir": "runs", "train.stage1_steps": 4, "train.stage2_steps": 2, "data.train_size": 8,
        "data.val_size": 4, "data.test_size": 4})
    tiny = [o for o in tiny if not o.startswith("latents.num_latents=")]  # (the docs' own K stays)
    env = {**os.environ, "LIVR_QUIET": "0", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in QUIET_ENV:
        env.pop(key, None)
    first_run, took = None, []
    for rel, line in commands:
        argv = _placed(shlex.split(line)[1:], tmp_path, first_run)
        argv += _tiny_args(argv, tiny)
        t0 = time.monotonic()
        if argv[0] == "train" and first_run is None:
            name = next(a.split("=", 1)[1] for a in argv if a.startswith("name="))
            _check_console(subprocess.run([sys.executable, "-m", "livr.cli", *argv], cwd=tmp_path, env=env,
                                          check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          timeout=300), rel, line, name, tmp_path)
            first_run = str(tmp_path / "runs" / name)
        else:
            code, err = main(argv), capsys.readouterr().err
            assert code == 0, f"{rel}: `{line}` failed: {err[-2000:]}"
            assert "\r" not in err and "\x1b[" not in err, f"{rel}: `{line}`: a progress bar off a terminal: {err[:300]}"
        took.append(f"{time.monotonic() - t0:5.1f} s  {rel}: {line[:90]}")
    print("\n".join(took))  # (pytest -s: where the time goes)
    assert first_run and os.path.isfile(os.path.join("exported", "config.json"))  # (README: livr export --out exported/)


def _check_console(p, rel: str, line: str, name: str, tmp_path) -> None:
    log = p.stdout
    assert p.returncode == 0, f"{rel}: `{line}` failed: {log[-3000:]}"
    assert "\r" not in log and "\x1b[" not in log, log[:2000]
    assert "is_gradient_checkpointing" not in log and "Setting accelerator to CPU" not in log
    assert "Creating initial MLflow database tables" not in log  # (a new sqlite store: MLflow's INFO lines)
    epochs = re.findall(r"^\[livr\] (stage[12]) epoch (\d)/(\d) \(global step \d+\): loss \d+\.\d+, "
                        r"val_accuracy \d\.\d+$", log, re.MULTILINE)
    assert [e[0] for e in epochs] == ["stage1", "stage1", "stage2"], log  # 8 rows / batch 4: 2 steps an epoch
    tail = log.strip().splitlines()[-2:]
    assert tail[0] == f"run directory: {os.path.join('runs', name)}"
    with open(tmp_path / "runs" / name / "mlflow_run_id") as f:
        assert tail[1].startswith(f"MLflow run: {f.read().strip()} (experiment 'livr-demo', tracking URI sqlite:///")
