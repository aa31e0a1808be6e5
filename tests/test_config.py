"""Typed config: YAML + key=value overrides, one-line validation errors, save/reload, the CLI."""
import glob
import subprocess
import sys

import pytest

import livr.data  # noqa: F401 (registers the task-name and packing checks, as the CLI does before loading a config)
from livr.config import Config, ConfigError, load_config, save_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nlatents:\n  num_latents: 4\noptim:\n  lr: 1e-4\ndata:\n  tasks: [Counting, Jigsaw]\n")
    cfg = load_config(str(p), ["latents.num_latents=8", "train.mode=sft", "data.tasks=[Jigsaw]", "optim.lr=3e-4"])
    assert isinstance(cfg, Config)
    assert cfg.name == "x" and cfg.optim.lr == 3e-4 and cfg.data.tasks == ["Jigsaw"]
    assert cfg.train.mode == "sft" and cfg.latents.num_latents == 0  # SFT = the same pipeline with K = 0
    assert load_config(str(p)).optim.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string: still a float


def test_saved_config_reproduces(tmp_path):
    cfg = load_config(None, ["name=r1", "latents.num_latents=3", "lora.targets=[q_proj, v_proj]", "data.options={max_count: 6}"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize("override, message", [
    ("train.epochz=3", "unknown key 'train.epochz'"),
    ("nosuch=1", "unknown key 'nosuch'"),
    ("train.stage1_epochs=abc", "train.stage1_epochs must be float, got 'abc'"),
    ("train.micro_batch_size=2.5", "train.micro_batch_size must be int, got 2.5"),
    ("latents.num_latents=-1", "latents.num_latents=-1"),
    ("train.stage2_epochs=-2", "train.stage2_epochs=-2.0: must be >= 0"),
    ("data.tasks=[Countin]", "data.tasks='Countin': unknown task"),
    ("train.mode=dpo", "train.mode='dpo': must be one of livr, sft"),
    ("model.trust_remote_code=maybe", "model.trust_remote_code must be bool"),
    ("latents=3", "latents must be a mapping"),
    ("novalue", "not of the form key=value"),
    ("train.nonfinite=ignore", "train.nonfinite='ignore': must be one of skip, stop"),
    ("train.max_nonfinite_skips=-1", "train.max_nonfinite_skips=-1: must be >= 0"),
    ("distributed.storage_shared=maybe", "distributed.storage_shared must be bool"),
    ("tracking.system_metrics_interval_s=0", "tracking.system_metrics_interval_s=0.0: must be > 0"),
])
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_blink_tasks_allowed_for_hub_source():
    cfg = load_config(None, ["data.source=hub", "data.tasks=[Art_Style, Semantic_Correspondence]"])
    assert cfg.data.tasks == ["Art_Style", "Semantic_Correspondence"]
    with pytest.raises(ConfigError, match="Art_Style"):
        load_config(None, ["data.tasks=[Art_Style]"])  # no synthetic generator for it


def test_shipped_configs_validate():
    for path in glob.glob("configs/**/*.yaml", recursive=True):
        load_config(path)


def _livr(*argvs: list[str]) -> list[subprocess.CompletedProcess]:
    """`livr ARGV` for each argv, as separate processes started together (their start-ups overlap)."""
    procs = [subprocess.Popen([sys.executable, "-m", "livr.cli", *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for a in argvs]
    done = []
    try:
        for a, p in zip(argvs, procs):
            out, err = p.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(a, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def test_cli_config_show_and_errors():
    out, bad, helped = _livr(["config", "show", "--config", "configs/demo.yaml", "latents.num_latents=5"],
                             ["config", "show", "--config", "configs/demo.yaml", "train.mode=dpo"], ["--help"])
    assert out.returncode == 0, out.stderr
    assert "num_latents: 5" in out.stdout and "backbone: tiny-qwen2.5-vl" in out.stdout
    assert bad.returncode == 2 and "train.mode='dpo'" in bad.stderr and "Traceback" not in bad.stderr
    assert helped.returncode == 0


def test_cli_make_tiny_and_synthetic(tmp_path):
    tiny, out = _livr(["backbone", "make-tiny", "tiny-llava-onevision", str(tmp_path / "bb")],
                      ["data", "make-synthetic", "--out", str(tmp_path / "d"), "--tasks", "Counting", "Jigsaw",
                       "--train", "8", "--val", "4", "--test", "4", "--parquet"])
    assert tiny.returncode == 0, tiny.stderr
    assert (tmp_path / "bb" / "config.json").exists() and (tmp_path / "bb" / "model.safetensors").exists()
    assert out.returncode == 0, out.stderr
    for task in ("Counting", "Jigsaw"):
        assert (tmp_path / "d" / task / "train.parquet").exists()
        assert (tmp_path / "d" / task / "dataset_dict.json").exists()


@pytest.mark.parametrize("raw", ["off", "yes", "no", "on", "null", "~", "1e3", "1.50", "0x10", "007", "true"])
def test_str_override_keeps_the_text_as_typed(raw):
    cfg = load_config(None, [f"name={raw}", f"tracking.run_name={raw}", f"data.train_split={raw}"])
    assert cfg.name == raw and cfg.tracking.run_name == raw and cfg.data.train_split == raw
    assert load_config(None, ["name='quoted'"]).name == "quoted"  # a YAML-quoted string loses its quotes


@pytest.mark.parametrize("override, value", [
    ("train.eval_every_epoch=off", False), ("train.resume=yes", True), ("optim.lr=1e3", 1e3),
    ("train.log_every=0x10", 16), ("data.tasks=[Counting]", ["Counting"])])
def test_typed_overrides_keep_their_parsing(override, value):
    key, _ = override.split("=", 1)
    section, field_ = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), field_) == value


@pytest.mark.parametrize("override, message", [
    ("train.log_every=off", "train.log_every must be int, got False"),
    ("train.resume=null", "train.resume must be bool, got None"),
    ("name=", "name='': must be one directory name")])
def test_typed_override_errors_stay_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)
