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
    import livr.data.tasks  # noqa: F401 (the data layer registers the task-name check; every entry point imports it)

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
    for rel in DOCS + ["livr/tools/demo.py"]:
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

    from livr.utils.console import quiet_third_party

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
    assert not kept("transformers.processing_utils", "`PaddleOCRVLProcessor` defines `image_processor_class = "
                    "'AutoImageProcessor'`, which is deprecated. Register the correct mapping in `AutoImageProcessor`.")
    assert kept("DeepSpeed", "ZeRO: some real warning") and kept(ray, "another message")


def test_causal_suite_reports_progress(monkeypatch, capsys):
    """`livr inspect --causal` runs minutes on a CPU: one line per phase on stderr, none under LIVR_QUIET=1."""
    from livr.insight import causal_report

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
def test_export_names_a_processor_stock_transformers_loads_without_torchvision(stock_transformers, tmp_path):
    """The Qwen processors build a video processor (torchvision, which the CPU stack lacks): the export names the
    image-only PaddleOCRVLProcessor instead, so no note; LLaVA-OneVision's note points to trust_remote_code=True
    (where torchvision is missing); Gemma 3's processor has no video processor. Checked against stock transformers
    in a process that never imports livr: the classes take (or do not take) a video processor as assumed. (That the
    exports load and answer as livr eval does: tests/backbones/test_adapter_reload.py, per family.)"""
    import importlib.util

    from transformers import Gemma3Processor, LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor

    from livr.tools.export import IMAGE_ONLY, processor_note

    have_tv = importlib.util.find_spec("torchvision") is not None
    assert processor_note(Qwen2_5_VLProcessor) is None and processor_note(Qwen3VLProcessor) is None
    assert processor_note(Gemma3Processor) is None
    note = processor_note(LlavaOnevisionProcessor)
    assert (note is None) == have_tv and (processor_note(Qwen3VLProcessor, "Qwen3VLProcessor") is None) == have_tv
    if note:
        assert "trust_remote_code=True" in note and "LlavaOnevisionProcessor" in note and "\n" not in note
    code = ("import inspect, sys; import transformers as t\n"
            "has = lambda c: 'video_processor' in inspect.signature(getattr(t, c)).parameters\n"
            f"assert all(has(c) and not has(i) for c, i in {IMAGE_ONLY!r}.items())\n"
            "assert has('LlavaOnevisionProcessor') and not has('Gemma3Processor')\n"
            "assert 'livr' not in sys.modules\n"
            "print(t.utils.is_torchvision_available())")
    rc, stdout, stderr = stock_transformers.run_code(code, str(tmp_path / "stock"), timeout=120)  # (conftest.py)
    assert rc == 0, stderr[-2000:]
    assert "\n".join(stdout).strip() == str(have_tv)
