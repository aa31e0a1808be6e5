"""A VLM livr has no module for, declared in the config (`model.family`): a tiny remote-code model (config.json with
an auto_map and its own configuration_/modeling_ files; Qwen-VL-style image tokens, a Qwen3-style LM, as
LLaVA-OneVision-1.5 ships) trains through both stages by config alone and passes verify; a declared family whose
bottleneck leaks fails verify; bad declarations are one-line errors."""
import json

import pytest
import torch
import yaml
from conftest import tiny_overrides

from livr.config import ConfigError, load_config

CONFIGURATION = '''from transformers import Qwen3VLConfig


class TinyRemoteVLConfig(Qwen3VLConfig):
    model_type = "tiny_remote_vl"
'''
MODELING = '''from transformers import Qwen3VLForConditionalGeneration

from .configuration_tiny_remote_vl import TinyRemoteVLConfig


class TinyRemoteVLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    config_class = TinyRemoteVLConfig
'''
QWEN_LM = r"(.*\.)?language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
FAMILY = {  # everything, no `base`: the config alone describes the model
    "name": "tiny_remote_vl", "model_types": ["tiny_remote_vl"], "auto_class": "AutoModelForImageTextToText",
    "processor_class": "Qwen3VLProcessor",
    "image_processor_class": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil",
    "image_token": "<|image_pad|>", "assistant_header": "<|im_start|>assistant\n", "end_of_turn": "<|im_end|>",
    "forward_keys": ["pixel_values", "image_grid_thw", "mm_token_type_ids"], "rope": "mrope",
    "lora_target_regex": QWEN_LM, "frozen_module_regex": r"(.*\.)?visual(\..*)?",
}


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory):
    """Weights of a tiny Qwen3-VL-shaped model saved under a model_type transformers does not know, with the
    remote code that defines it."""
    from livr.backbones import FAMILIES
    from livr.backbones.base import random_model

    d = tmp_path_factory.mktemp("remote_vlm")
    fam = FAMILIES["qwen3_vl"]
    cfg, tok, ip = fam.tiny_parts()
    random_model(fam, cfg, tok, seed=3).save_pretrained(d)
    tok.save_pretrained(d)
    ip.save_pretrained(d)
    (d / "configuration_tiny_remote_vl.py").write_text(CONFIGURATION)
    (d / "modeling_tiny_remote_vl.py").write_text(MODELING)
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="tiny_remote_vl", architectures=["TinyRemoteVLForConditionalGeneration"], auto_map={
        "AutoConfig": "configuration_tiny_remote_vl.TinyRemoteVLConfig",
        "AutoModelForImageTextToText": "modeling_tiny_remote_vl.TinyRemoteVLForConditionalGeneration"})
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def _config(remote_dir, backbone_cache, data_cache, tmp_path, family, **extra):
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump({"model": {"backbone": remote_dir, "trust_remote_code": True, "family": family}}))
    over = tiny_overrides(backbone_cache, data_cache, tmp_path, **{"train.stage1_steps": 2, "train.stage2_steps": 2,
                                                                    **extra})
    return load_config(str(path), over)


@pytest.fixture(scope="module")
def remote_run(remote_dir, backbone_cache, data_cache, tmp_path_factory):
    """The remote-code VLM trained through both stages by config alone (2 + 2 steps)."""
    from livr.training.train import train_worker

    tmp = tmp_path_factory.mktemp("remote_run")
    cfg = _config(remote_dir, backbone_cache, data_cache, tmp, FAMILY, name="remote")
    return cfg, train_worker(cfg)


def test_a_remote_code_vlm_trains_by_config_alone_and_passes_verify(remote_dir, remote_run):
    from livr.backbones import family_for
    from livr.insight.verify import verify
    from livr.training.runs import load_run

    with pytest.raises(ValueError, match="unsupported model_type 'tiny_remote_vl'"):
        family_for(remote_dir)  # not a registered family: only the declaration makes it loadable
    cfg, result = remote_run
    checks = verify(cfg)
    assert all(c.passed for c in checks), "\n".join(c.line() for c in checks)
    assert result["global_step"] == 4
    _, lm = load_run(cfg.run_dir)
    assert type(lm.model.get_base_model()).__name__ == "TinyRemoteVLForConditionalGeneration"
    assert lm.family.name == "tiny_remote_vl" and lm.family.mrope


def test_the_remote_code_run_exports_and_reloads_exactly_in_stock_libraries(remote_dir, remote_run, stock_transformers,
                                                                            tmp_path):
    """As for the registered families: stock PEFT on the remote-code base reproduces every logit; the export (its
    remote code carried along) answers in stock transformers exactly as livr eval does."""
    from test_adapter_reload import stock_answers, stock_peft_logits
    from transformers import AutoModelForImageTextToText

    from livr.data.sequence import collate
    from livr.data.synthetic import generate_task
    from livr.tools.export import export_run
    from livr.training.evaluate import evaluate_rows
    from livr.training.runs import load_run

    cfg, _ = remote_run
    _, lm = load_run(cfg.run_dir)
    lm.model.eval()
    batch = collate([lm.builder.encode(r) for r in generate_task("Counting", 2, seed=9)], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = lm.forward(batch, bottleneck=False)
    base = AutoModelForImageTextToText.from_pretrained(remote_dir, trust_remote_code=True)
    out = stock_peft_logits(base, cfg.run_dir, batch, lm.family.forward_keys)
    assert torch.equal(out, logits), f"max |Δ| {(out - logits).abs().max():.3g}"

    rows = generate_task("Counting", 2, seed=4) + generate_task("Jigsaw", 2, seed=4)
    want = [p["output"] for p in evaluate_rows(lm, rows, batch_size=2, max_new_tokens=6)["predictions"]]
    export_run(cfg.run_dir, str(tmp_path / "export"))
    assert (tmp_path / "export" / "modeling_tiny_remote_vl.py").is_file()  # the remote code travels with it
    assert stock_answers(stock_transformers, str(tmp_path / "export"), lm, rows, trust_remote_code=True) == want


def test_a_declared_family_that_leaks_fails_verify(remote_dir, backbone_cache, data_cache, tmp_path):
    """The wrong image token: livr's groups miss the real image tokens, so the answer rows see them."""
    from livr.insight.verify import verify

    cfg = _config(remote_dir, backbone_cache, data_cache, tmp_path, {**FAMILY, "image_token": "<|vision_end|>"})
    checks = {c.name[:3]: c for c in verify(cfg)}
    assert not checks["(a)"].passed and checks["(a)"].value > 0


@pytest.mark.parametrize(("change", "words"), [
    ({"lora_target_regex": "(unclosed"}, "model.family.lora_target_regex='(unclosed': not a valid regular expression"),
    ({"rope": "alibi"}, "model.family.rope='alibi': must be 1d or mrope"),
    ({"auto_class": "AutoModelForNothing"}, "model.family.auto_class='AutoModelForNothing': no such class"),
    ({"image_tokens": "<x>"}, "model.family.image_tokens='<x>': unknown key"),
    ({"base": "qwen9"}, "model.family.base='qwen9': not a registered family"),
])
def test_bad_declarations_are_one_line_errors(change, words, remote_dir, backbone_cache, data_cache, tmp_path):
    with pytest.raises(ConfigError) as e:
        _config(remote_dir, backbone_cache, data_cache, tmp_path, {**FAMILY, **change})
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_plan_reads_a_declared_family(remote_dir, tmp_path, capsys):
    """`livr plan` on the remote-code VLM: the declared family, the parameter count of its remote class, and the
    image tokens its processor really produces."""
    import os

    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from livr.cli import main

    cfg = tmp_path / "remote.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"backbone": remote_dir, "trust_remote_code": True, "family": FAMILY}}))
    assert main(["plan", "--config", str(cfg), "--images", "2", "--image-size", "112x112", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    model = AutoModelForImageTextToText.from_pretrained(remote_dir, trust_remote_code=True)
    assert plan["counts"]["family"] == "tiny_remote_vl"
    assert plan["counts"]["total"] == sum(p.numel() for p in model.parameters())
    from transformers import AutoConfig, AutoTokenizer

    from livr.backbones import FAMILIES
    from livr.backbones.base import make_processor

    tok = AutoTokenizer.from_pretrained(remote_dir)
    ip = FAMILIES["qwen3_vl"].image_processor_class.from_pretrained(remote_dir)
    proc = make_processor(FAMILIES["qwen3_vl"], ip, tok, AutoConfig.from_pretrained(remote_dir, trust_remote_code=True))
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": "hi"}]}],
                                   add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[[Image.new("RGB", (112, 112))] * 2], return_tensors="pt")
    assert sum(plan["sequence"]["per_image"]) == int((enc["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert os.path.isdir(remote_dir)
