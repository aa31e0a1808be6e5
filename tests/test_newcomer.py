"""A newcomer's mistakes (issue 31): each is one line naming the key or path, before anything loads, and a launch
that fails its checks leaves nothing behind (no run directory, no MLflow run)."""
import os

import pytest
from conftest import tiny_overrides

from livr.cli import main
from livr.config import ConfigError, load_config

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


@pytest.mark.parametrize("value, hint", [
    ("counting", "unknown task 'counting' (did you mean 'Counting'?)"),
    ("[jigsaw]", "unknown task 'jigsaw' (did you mean 'Jigsaw'?)"),
    ("Countng", "(did you mean 'Counting'?)"),
    ("Counting,Jigsaw", "a list is written data.tasks=[Counting,Jigsaw]"),
])
def test_task_names_hint_the_spelling_and_the_list_syntax(value, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.tasks={value}"])
    assert hint in str(e.value) and "\n" not in str(e.value)


def test_missing_data_source_is_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", DEMO, "data.source=./nowhere", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    err = _err(capsys)
    assert code == 2 and "data.source='./nowhere'" in err and "synthetic" in err and "hub" in err
    assert os.listdir(tmp_path) == []  # no runs/<name>/, no mlflow.db
    code = main(["train", "--config", DEMO, "data.test_source=/no/such/dir"])
    assert code == 2 and "data.test_source='/no/such/dir'" in _err(capsys)


def test_eval_of_a_missing_run_says_so(tmp_path, capsys):
    (tmp_path / "runs" / "first").mkdir(parents=True)
    (tmp_path / "runs" / "second").mkdir()
    assert main(["eval", "--run", str(tmp_path / "runs" / "frist")]) == 2
    err = _err(capsys)
    assert f"no such run: {tmp_path / 'runs' / 'frist'}" in err and f"did you mean {tmp_path / 'runs' / 'first'}" in err
    assert main(["eval", "--run", str(tmp_path / "elsewhere" / "x")]) == 2
    assert f"no such run: {tmp_path / 'elsewhere' / 'x'}" in _err(capsys)
    assert main(["eval", "--run", str(tmp_path / "runs" / "first")]) == 2  # there but not a run: what it lacks
    assert "is incomplete (missing config.yaml" in _err(capsys)


def test_a_launch_failing_its_data_checks_leaves_nothing(data_cache, tmp_path, capsys):
    """Data that exists but holds no rows: a DataError after the lock was taken; no run dir, no runs/, no MLflow run."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "bb").mkdir()
    over = tiny_overrides(str(tmp_path / "bb"), data_cache, tmp_path, **{"data.source": str(tmp_path / "empty"),
                                                                         "data.tasks": "[Jigsaw]"})
    assert main(["train", "--config", DEMO, *over]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("livr: error: Jigsaw/train: no data in")
    assert not (tmp_path / "runs").exists()
    assert os.listdir(tmp_path / "bb") == []  # checked before the backbone was built
    import mlflow

    if (tmp_path / "mlflow.db").exists():
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        assert all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())


# ----------------------------------------------------------------------------- the docs, followed literally
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def test_printed_mlflow_ui_commands_leave_no_job_executor_behind():
    """`mlflow ui` as the docs and the demo print it starts no huey_consumer processes that outlive Ctrl-C."""
    found = 0
    for rel in DOCS + ["livr/demo.py"]:
        for line in _read(rel).splitlines():
            if "mlflow ui --" in line:
                found += 1
                assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in line, f"{rel}: {line.strip()}"
    assert found >= 3


def test_relative_links_and_spec_references_resolve():
    """Every relative markdown link in README.md and docs/ points into the repository; the method's reference
    (docs/method.md) is in it, and no doc sends the reader to a spec file that is not."""
    import re

    for rel in DOCS:
        text = _read(rel)
        assert "LIVR_SPEC.md" not in text, rel
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), target))
            assert os.path.exists(path), f"{rel}: link to {target} (no such file)"
    assert "docs/method.md" in _read("docs/testing.md") or "(method.md)" in _read("docs/testing.md")


def test_short_runs_and_written_paths_are_documented():
    for rel in ("README.md", "docs/single_gpu.md"):
        assert "train.stage1_steps=" in _read(rel) and "train.stage2_steps=" in _read(rel), rel
    ignored = {line.strip() for line in _read(".gitignore").splitlines()}
    assert {"/data/", "/exported/", "runs/", "mlflow.db", "mlartifacts/"} <= ignored  # root-anchored: not livr/data/


# ----------------------------------------------------------------------------- the console
def test_known_third_party_noise_is_filtered_and_nothing_else():
    import logging
    import warnings

    from livr.console import quiet_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]

    def kept(logger: str, msg: str) -> bool:
        return bool(logging.getLogger(logger).filter(logging.LogRecord(logger, logging.WARNING, "", 0, msg, (), None)))

    ray = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    assert not kept("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    assert not kept(ray, "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
    assert kept("DeepSpeed", "ZeRO: some real warning") and kept(ray, "another message")


def _marked_blocks(kind: str) -> list[tuple[str, str]]:
    """(file, livr command) of the fenced blocks marked `<!-- docs-test: KIND ... -->` in README.md and docs/."""
    import re

    out = []
    for rel in DOCS:
        for block in re.findall(r"<!-- docs-test: " + kind + r"\b[^>]*-->\s*\n```[a-z]*\n(.*?)```", _read(rel), re.DOTALL):
            out += [(rel, line) for line in _commands(block)]
    return out


def test_docs_cpu_blocks_run_as_written_and_the_console_says_what_matters(backbone_cache, data_cache, tmp_path,
                                                                          monkeypatch, capsys):
    """Each command of a block marked `docs-test: cpu` (docs/quickstart.md's first run) runs as written, from a
    directory holding the repository's configs, with tiny sizes appended by this test. Its `livr train`, logged to a
    file: no progress-bar escape codes, one line per epoch with loss and validation accuracy, no known noise, and at
    the end the run directory and the MLflow run."""
    import re
    import shlex
    import subprocess
    import sys

    blocks = _marked_blocks("cpu")
    assert {rel for rel, _ in blocks} >= {"docs/quickstart.md"}
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    for key in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX"):
        monkeypatch.setenv(key, "1")  # (restored after: livr.console sets them in this process)
    tiny = tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "output_dir": "runs", "train.stage1_steps": 4, "train.stage2_steps": 2, "data.train_size": 8,
        "data.val_size": 4, "data.test_size": 4})
    env = {**os.environ, "LIVR_QUIET": "0", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX"):
        env.pop(key, None)
    ran = []
    for rel, line in blocks:
        argv = shlex.split(line)[1:]
        ran.append(argv[0])
        if argv[0] != "train":
            assert main(argv) == 0, f"{rel}: `{line}` failed: {capsys.readouterr().err[-2000:]}"
            continue
        p = subprocess.run([sys.executable, "-m", "livr.cli", *argv, *tiny], cwd=tmp_path, env=env, check=False,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        log = p.stdout
        assert p.returncode == 0, f"{rel}: `{line}` failed: {log[-3000:]}"
        assert "\r" not in log and "\x1b[" not in log, log[:2000]
        assert "is_gradient_checkpointing" not in log and "Setting accelerator to CPU" not in log
        assert "Creating initial MLflow database tables" not in log  # (a new sqlite store: MLflow's INFO lines)
        epochs = re.findall(r"^\[livr\] (stage[12]) epoch (\d)/(\d) \(global step \d+\): loss \d+\.\d+, "
                            r"val_accuracy \d\.\d+$", log, re.MULTILINE)
        assert [e[0] for e in epochs] == ["stage1", "stage1", "stage2"], log  # 8 rows / batch 4: 2 steps an epoch
        name = next(a.split("=", 1)[1] for a in argv if a.startswith("name="))
        tail = log.strip().splitlines()[-2:]
        assert tail[0] == f"run directory: {os.path.join('runs', name)}"
        with open(tmp_path / "runs" / name / "mlflow_run_id") as f:
            assert tail[1].startswith(f"MLflow run: {f.read().strip()} (experiment 'livr-demo', tracking URI sqlite:///")
    assert {"train", "eval", "report"} <= set(ran), ran


def test_causal_suite_reports_progress(monkeypatch, capsys):
    """`livr inspect --causal` runs minutes on a CPU: one line per phase on stderr, none under LIVR_QUIET=1."""
    from livr import causal_report

    for name in ("interventions", "patching", "representations"):
        monkeypatch.setattr(causal_report, name, lambda *a, _n=name, **k: {"ran": _n})
    monkeypatch.setenv("LIVR_QUIET", "0")
    out = causal_report.run_causal(None, [{}, {}], seeds=1)
    assert out == {n: {"ran": n} for n in ("interventions", "patching", "representations")}
    lines = capsys.readouterr().err.strip().splitlines()
    assert [ln.split(" on ")[0] for ln in lines[:3]] == [
        "[livr inspect --causal] 1/3 interventions", "[livr inspect --causal] 2/3 patching",
        "[livr inspect --causal] 3/3 representations"] and lines[3].startswith("[livr inspect --causal] done in")
    monkeypatch.setenv("LIVR_QUIET", "1")
    causal_report.run_causal(None, [{}], seeds=1)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- the export on the CPU stack
def test_export_names_a_processor_stock_transformers_loads_without_torchvision():
    """The Qwen processors build a video processor (torchvision, which the CPU stack lacks): the export names the
    image-only PaddleOCRVLProcessor instead, so no note; LLaVA-OneVision's note points to trust_remote_code=True
    (where torchvision is missing); Gemma 3's processor has no video processor. Checked against stock transformers
    in a process that never imports livr: the classes take (or do not take) a video processor as assumed. (That the
    exports load and answer as livr eval does: tests/test_adapter_reload.py, per family.)"""
    import importlib.util
    import subprocess
    import sys

    from transformers import Gemma3Processor, LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor

    from livr.export import IMAGE_ONLY, processor_note

    have_tv = importlib.util.find_spec("torchvision") is not None
    assert processor_note(Qwen2_5_VLProcessor) is None and processor_note(Qwen3VLProcessor) is None
    assert processor_note(Gemma3Processor) is None
    note = processor_note(LlavaOnevisionProcessor)
    assert (note is None) == have_tv
    if note:
        assert "trust_remote_code=True" in note and "LlavaOnevisionProcessor" in note and "\n" not in note
    code = ("import inspect, sys; import transformers as t\n"
            "has = lambda c: 'video_processor' in inspect.signature(getattr(t, c)).parameters\n"
            f"assert all(has(c) and not has(i) for c, i in {IMAGE_ONLY!r}.items())\n"
            "assert has('LlavaOnevisionProcessor') and not has('Gemma3Processor')\n"
            "assert 'livr' not in sys.modules\n"
            "print(t.utils.is_torchvision_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(have_tv)


def _commands(block: str) -> list[str]:
    """The `livr ...` command lines of a fenced block: continuation lines joined, the comment and leading VAR=value
    assignments dropped, optional `[--flag ...]` groups removed."""
    import re

    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        line = re.sub(r"^(?:[A-Z_]+=\S*\s+)+", "", line)
        if line.startswith("livr ") and not line.startswith("livr verify:"):
            out.append(re.sub(r"\s\[--[^\]]*\]", "", line))
    return out


def _doc_commands() -> list[tuple[str, str]]:
    """(file, command line) of every `livr ...` command in a fenced block of README.md and docs/*.md."""
    import re

    return [(rel, line) for rel in DOCS for block in re.findall(r"```[a-z]*\n(.*?)```", _read(rel), re.DOTALL)
            for line in _commands(block)]


def test_every_documented_livr_command_parses_and_its_config_resolves(monkeypatch):
    """A documented command whose flags or config keys stop existing fails here: each one parses with livr's CLI, and
    where it names a config in the repository, that config with its overrides resolves (placeholders such as RUN,
    DIR, $VAR and configs written by earlier commands are parsed only)."""
    import shlex

    from livr.cli import build_parser

    monkeypatch.chdir(ROOT)
    commands = _doc_commands()
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


def test_every_docs_block_with_a_livr_command_says_where_it_runs():
    """Each bash block of docs/*.md holding a livr command is marked `<!-- docs-test: KIND ... -->`: cpu (run by
    the suite, above), slow (runs on a CPU, in minutes), gpu, cluster, server, data (needs files you download) or
    hub. (README.md's blocks are not marked yet.)"""
    import re

    kinds = ("cpu", "slow", "gpu", "cluster", "server", "data", "hub")
    unmarked = []
    for rel in DOCS[1:]:
        text = _read(rel)
        for m in re.finditer(r"(?:<!-- docs-test: (\w+)[^>]*-->\s*\n)?```bash\n(.*?)```", text, re.DOTALL):
            if _commands(m.group(2)) and m.group(1) not in kinds:
                unmarked.append(f"{rel}:{text[:m.start()].count(chr(10)) + 1} ({m.group(1) or 'no marker'})")
    assert not unmarked, unmarked
