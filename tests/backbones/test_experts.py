"""LoRA on a MoE backbone's fused 3-D expert weights (`lora.expert_targets`, PEFT target_parameters) and the
refusals `livr` gives from the backbone's config before any weight loads (livr/backbones/preflight.py)."""
import json
import os

import pytest
import torch
from conftest import livr_train, livr_train_whole_and_cut, tiny_overrides
from safetensors.torch import load_file
from test_adapter_reload import _as_if_trained, stock_answers, stock_peft_logits

from livr.backbones import load_backbone, preset_parts
from livr.backbones.preflight import check_before_loading
from livr.config import ConfigError, load_config, save_config
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.model.build import build_model, param_groups
from livr.training.checkpoint import save_run_artifacts

MOE = ["tiny-qwen3.5-moe", "tiny-qwen3-vl-moe"]
EXPERTS = {"lora.expert_targets": "[gate_up_proj,down_proj]", "lora.dropout": 0}


def _cfg(backbone_cache, data_cache, tmp, **extra):
    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp, name="e", **extra))


@pytest.fixture(scope="module", params=MOE)
def expert_run(request, tmp_path_factory, backbone_cache, data_cache):
    tmp = tmp_path_factory.mktemp("experts")
    cfg = _cfg(backbone_cache, data_cache, tmp, **{"model.backbone": request.param, **EXPERTS})
    os.makedirs(cfg.run_dir)
    save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    lm = build_model(cfg)
    rows = generate_task("Counting", 2, seed=9)
    batch = collate([lm.builder.encode(r) for r in rows], lm.tokenizer.pad_token_id)
    return cfg, lm, batch


def _experts(model):
    return {n: p for n, p in model.named_parameters() if ".mlp.experts." in n and "lora_" not in n}


def test_expert_lora_trains_and_the_router_stays_frozen(expert_run):
    """Every MoE layer's gate_up_proj and down_proj take a LoRA pair; one AdamW step moves it (the base experts and
    the router `mlp.gate` stay bit-identical and have no gradient); the expert LoRA changes the answer logits."""
    _, lm, batch = expert_run
    layers = lm.model.get_base_model().config.get_text_config().num_hidden_layers
    trainable = {n: p for n, p in lm.model.named_parameters() if p.requires_grad}
    expert_lora = [n for n in trainable if ".mlp.experts." in n]
    assert len(expert_lora) == 2 * 2 * layers  # A and B for each of the two 3-D parameters per layer
    routers = {n: p for n, p in lm.model.named_parameters() if n.endswith(".mlp.gate.weight")}
    assert len(routers) == layers and not any(p.requires_grad for p in routers.values())
    before = {n: p.detach().clone() for n, p in {**routers, **_experts(lm.model)}.items()}
    lora_before = {n: trainable[n].detach().clone() for n in expert_lora}
    opt = torch.optim.AdamW(param_groups(lm.model, 0.01), lr=1e-2)
    lm.model.train()
    nll, count = lm.answer_nll(batch, bottleneck=True)
    (nll / count).backward()
    assert all(trainable[n].grad is not None and trainable[n].grad.abs().sum() > 0 for n in expert_lora
               if ".lora_B." in n)  # (B starts at zero, so A's first gradient is zero; B's is not)
    opt.step()
    opt.zero_grad()
    lm.model.eval()
    assert all(torch.equal(p, before[n]) for n, p in {**routers, **_experts(lm.model)}.items())
    assert all(not torch.equal(trainable[n], lora_before[n]) for n in expert_lora if ".lora_B." in n)
    with torch.no_grad():
        on = lm.forward(batch, bottleneck=False)
        with lm.model.disable_adapter():
            off = lm.forward(batch, bottleneck=False)
    assert not torch.equal(on, off)


def test_expert_lora_reloads_in_stock_peft_exactly(expert_run):
    """The adapter names the experts in target_parameters; a stock PeftModel.from_pretrained on a fresh base gives
    bit-identical logits (every vocabulary column)."""
    cfg, lm, batch = expert_run
    _as_if_trained(lm, seed=7)
    lm.model.eval()
    save_run_artifacts(lm, cfg.run_dir)
    with torch.no_grad():
        logits = lm.forward(batch, bottleneck=False)
    adapter = os.path.join(cfg.run_dir, "adapter")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        saved = json.load(f)
    assert sorted(saved["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    keys = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert any(".mlp.experts." in k and "lora_A" in k for k in keys)
    assert not any(".mlp.gate." in k for k in keys)  # no router weight in the adapter
    bb = load_backbone(cfg.model.backbone, cache_dir=cfg.model.cache_dir)
    out = stock_peft_logits(bb.model, cfg.run_dir, batch, lm.family.forward_keys)
    assert torch.equal(out, logits), f"max |Δ| {(out - logits).abs().max():.3g}"


def test_export_merges_the_expert_lora_for_stock_transformers(expert_run, stock_transformers, tmp_path):
    """`livr export` merges the expert LoRA into the fused expert weights: stock AutoModelForImageTextToText +
    generate give livr eval's answers."""
    from livr.cli import main
    from livr.training.evaluate import evaluate_rows

    cfg, lm, _ = expert_run
    _as_if_trained(lm, seed=11)
    lm.model.eval()
    save_run_artifacts(lm, cfg.run_dir)
    out = str(tmp_path / "export")
    assert main(["export", "--run", cfg.run_dir, "--out", out]) == 0
    rows = generate_task("Counting", 2, seed=4) + generate_task("Jigsaw", 1, seed=4)
    want = [p["output"] for p in evaluate_rows(lm, rows, batch_size=2, max_new_tokens=6)["predictions"]]
    assert stock_answers(stock_transformers, out, lm, rows) == want


@pytest.mark.slow
@pytest.mark.parametrize("backbone", MOE)
def test_two_stage_expert_lora_run_resumes_exactly(backbone, backbone_cache, data_cache, tmp_path):
    """`livr train` (torch engine) with expert LoRA on each MoE family, two stages (Stage 1 under the bottleneck:
    for tiny-qwen3.5-moe through its Gated DeltaNet layers too); killed after step 3 and resumed, it ends with the
    uninterrupted run's weights (expert LoRA included), bit for bit."""
    base = tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "model.backbone": backbone, **EXPERTS, "train.stage1_steps": 2, "train.stage2_steps": 2,
        "distributed.checkpoint_every": 1, "data.num_workers": 0, "eval.splits": "[val]"})
    whole, cut, again = livr_train_whole_and_cut(base, 3, tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert cut.returncode != 0 and "injected failure at step 3" in cut.stderr, cut.stderr[-2000:]
    assert again.returncode == 0, again.stderr[-3000:]
    runs = tmp_path / "runs"
    a, b = (load_file(str(runs / n / "checkpoints" / "last" / "trainable.safetensors")) for n in ("whole", "cut"))
    assert a.keys() == b.keys() and any(".mlp.experts." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(".mlp.experts." in k and "lora_B" in k and v.abs().sum() > 0 for k, v in a.items())


@pytest.mark.parametrize("experts", [False, True])
def test_plan_counts_experts_exactly(experts, backbone_cache, tmp_path):
    """plan's trainable = build_model's (LoRA on Linear layers + the experts' r·E·(in + out) + latent rows); the
    experts' parameters and the active parameters per token are counted from the config."""
    from livr.tools.plan import plan

    extra = EXPERTS if experts else {}
    cfg = _cfg(backbone_cache, backbone_cache, tmp_path, **{"model.backbone": "tiny-qwen3-vl-moe", **extra})
    c = plan(cfg, seq_len=128)["counts"]
    lm = build_model(cfg)
    assert c["trainable"] == sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
    text = lm.model.get_base_model().config.get_text_config()
    expert_params = sum(p.numel() for p in _experts(lm.model).values())
    assert c["experts"] == expert_params == 2 * 4 * 3 * 64 * 32  # 2 layers x 4 experts x (gate, up, down) 64x32
    e, k = text.num_experts, text.num_experts_per_tok
    assert c["active"] == c["total"] - expert_params * (e - k) // e
    assert (c["expert_lora"] > 0) == experts and (c["expert_layer_copy"] > 0) == experts


# ----------------------------------------------------------------------------- refusals before anything loads
@pytest.fixture
def no_loading(monkeypatch):
    """build_model must refuse before any weight loads: loading fails the test."""
    import livr.model.build

    def forbidden(*a, **k):
        raise AssertionError("the backbone was loaded before the config was refused")

    monkeypatch.setattr(livr.model.build, "load_backbone", forbidden)


def _refused(cfg, *words):
    for check in (check_before_loading, build_model):
        with pytest.raises(ConfigError) as e:
            check(cfg)
        msg = str(e.value)
        assert all(w in msg for w in words) and "\n" not in msg, msg


def test_expert_targets_on_a_model_without_experts_is_refused(no_loading, backbone_cache, tmp_path):
    cfg = _cfg(backbone_cache, backbone_cache, tmp_path, **{"model.backbone": "tiny-qwen3-vl", **EXPERTS})
    _refused(cfg, "lora.expert_targets", "no routed experts")


def test_expert_targets_need_known_names_and_no_dropout(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.expert_targets=.*no dropout.*lora.dropout=0"):
        load_config(None, ["lora.expert_targets=[gate_up_proj]"])
    with pytest.raises(ConfigError, match="lora.expert_targets='gate'"):
        load_config(None, ["lora.expert_targets=[gate]", "lora.dropout=0"])


def test_a_text_only_hybrid_is_refused_with_the_reason(no_loading, backbone_cache, tmp_path):
    """Qwen3-Next (text-only Gated DeltaNet hybrid): one ConfigError naming model.backbone, with why."""
    from transformers import Qwen3NextConfig

    d = tmp_path / "qwen3-next"
    Qwen3NextConfig(num_hidden_layers=4, hidden_size=64).save_pretrained(d)
    cfg = _cfg(backbone_cache, backbone_cache, tmp_path, **{"model.backbone": str(d)})
    _refused(cfg, "model.backbone", "qwen3_next", "text-only")


def test_unknown_hybrid_layer_types_are_refused_for_the_bottleneck(no_loading, backbone_cache, tmp_path):
    """A Qwen3.5 checkpoint with a layer type livr has no Stage-1 bottleneck for: refused for Stage 1, named."""
    config, _, _ = preset_parts("tiny-qwen3.5")
    config.text_config.layer_types[1] = "sliding_attention"
    d = tmp_path / "qwen3.5-new-layers"
    config.save_pretrained(d)
    cfg = _cfg(backbone_cache, backbone_cache, tmp_path, **{"model.backbone": str(d)})
    _refused(cfg, "model.backbone", "['sliding_attention']", "no Stage-1 bottleneck")


def test_flex_attention_for_a_hybrid_bottleneck_is_refused(no_loading, backbone_cache, tmp_path):
    """Qwen3.5's Stage-1 mask is a dict per layer type (its Gated DeltaNet layers read the token groups), which
    livr's flex BlockMask cannot carry: refused before loading, naming model.attn_implementation."""
    cfg = _cfg(backbone_cache, backbone_cache, tmp_path, **{"model.backbone": "tiny-qwen3.5",
                                                            "model.attn_implementation": "flex_attention"})
    _refused(cfg, "model.attn_implementation='flex_attention'", "qwen3_5", "sdpa")


# ----------------------------------------------------------------------------- ZeRO-3 (one process)
# tiny-qwen3-vl-moe: the family whose ZeRO-3 loading livr mends (experts.fix_zero3_expert_layout); the gather and
# save of expert LoRA is the same code for tiny-qwen3.5-moe (its own ZeRO-3 run: 15 s more of the suite)
@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["tiny-qwen3-vl-moe"])
def test_zero3_gathers_and_saves_the_expert_lora(backbone, backbone_cache, data_cache, tmp_path):
    """`livr train` in one process under ZeRO-3 (every parameter really partitioned) with LoRA on the experts: the
    saved adapter holds every expert LoRA tensor at its full shape, trained (not the empty partitions), and stock
    PEFT loads it onto a fresh base."""
    with open("deepspeed_configs/zero3.json") as f:
        ds = json.load(f)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3.json").write_text(json.dumps(ds))
    over = tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "model.backbone": backbone, **EXPERTS, "distributed.deepspeed": str(tmp_path / "z3.json"),
        "train.stage1_steps": 2, "train.stage2_steps": 2, "data.num_workers": 0, "eval.splits": "[val]",
        "name": "z3"})
    run = livr_train(over)
    assert run.returncode == 0, run.stderr[-3000:]
    adapter = tmp_path / "runs" / "z3" / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    experts = {k: v for k, v in saved.items() if ".mlp.experts." in k}
    r, e, h, i = 4, 4, 64, 32  # lora.r, experts, hidden, expert width of both tiny MoE presets
    want = {"lora_A": {(r * e, h), (r * e, i)}, "lora_B": {(2 * i, r * e), (h, r * e)}}
    layers = preset_parts(backbone)[0].get_text_config().num_hidden_layers
    assert len(experts) == layers * 2 * 2  # (gate_up_proj, down_proj) x (A, B) per layer
    for k, v in experts.items():
        assert tuple(v.shape) in want["lora_A" if "lora_A" in k else "lora_B"], (k, v.shape)
    assert all(v.abs().sum() > 0 for k, v in experts.items() if "lora_B" in k)  # trained off their zero init
    # (the first step of each stage has learning rate 0: the warm-up starts at 0)
    from peft import PeftModel

    bb = load_backbone(backbone, cache_dir=backbone_cache)
    with open(tmp_path / "runs" / "z3" / "vocab.json") as f:
        bb.model.resize_token_embeddings(json.load(f)["vocab"])
    stock = PeftModel.from_pretrained(bb.model, str(adapter))
    loaded = {n: p for n, p in stock.named_parameters() if ".mlp.experts." in n and "lora_B" in n}
    assert len(loaded) == 2 * layers and all(p.abs().sum() > 0 for p in loaded.values())
