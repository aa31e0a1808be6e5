"""What a first GPU run needs, tested on CPU (issue 25): DeepSpeed in one process (the single-GPU mode) with ZeRO-3
and CPU offload (DeepSpeed's CPU Adam), killed and resumed; config-time refusals before anything loads."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, livr_train_whole_and_cut, tiny_overrides
from safetensors.torch import load_file


def _offload_json(tmp_path) -> str:
    with open(os.path.join(ROOT, "deepspeed_configs", "zero3_offload.json")) as f:
        ds = json.load(f)  # as shipped (no optimizer in it: livr picks DeepSpeed's CPU Adam for the offload)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # really partition the tiny model
    path = tmp_path / "zero3_offload.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.slow
def test_one_process_zero3_offload_trains_two_stages_and_resumes_exactly(backbone_cache, data_cache, tmp_path):
    ds = _offload_json(tmp_path)
    base = tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "distributed.deepspeed": ds, "train.stage1_steps": 2, "train.stage2_steps": 2, "distributed.checkpoint_every": 1,
        "data.num_workers": 0, "eval.splits": "[val]"})
    whole, cut, again = livr_train_whole_and_cut(base, 3, tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "mpi4py" not in whole.stderr
    assert cut.returncode != 0 and "injected failure at step 3" in cut.stderr, cut.stderr[-2000:]
    assert again.returncode == 0, again.stderr[-3000:]
    runs = tmp_path / "runs"
    got = {n: json.loads((runs / n / "final_metrics.json").read_text()) for n in ("whole", "cut")}
    assert got["whole"]["global_step"] == got["cut"]["global_step"] == 4
    assert got["cut"]["resumed_from"] == [2] and got["whole"]["resumed_from"] == []
    meta = json.loads((runs / "cut" / "checkpoints" / "last" / "optimizer.json").read_text())
    assert meta["zero_stage"] == 3 and meta["optimizer"] == "DeepSpeedCPUAdam", meta
    # AdamW's moments are bit-identical (so was every gradient). The weights agree to an ulp: CPU Adam's C++ kernel
    # keeps beta^t as a running product, and after a restore recomputes it once with std::pow (DeepSpeed
    # csrc/includes/cpu_adam.h IncrementStep), so the bias correction differs in its last bit.
    for f, exact in (("optimizer.safetensors", True), ("trainable.safetensors", False)):
        a, b = (load_file(str(runs / n / "checkpoints" / "last" / f)) for n in ("whole", "cut"))
        assert a.keys() == b.keys() and a
        for k in a:
            same = torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
            assert same, (f, k, (a[k] - b[k]).abs().max().item())
    moments = load_file(str(runs / "whole" / "checkpoints" / "last" / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg_sq") and v.abs().sum() > 0 for k, v in moments.items())


# ----------------------------------------------------------------------------- flex_attention: graphs per run
def _groups(images: int, tokens_per_image: int, batch: int = 1) -> torch.Tensor:
    from livr.method.groups import ANSWER, IMAGE, LATENT, PROMPT, TEXT

    seq = [TEXT] * 14
    for _ in range(images):
        seq += [IMAGE] * tokens_per_image + [PROMPT] * 2
    seq += [PROMPT] * 60 + [LATENT] * 17 + [ANSWER] * 2
    return torch.tensor([seq] * batch)


@pytest.mark.slow
def test_compiled_flex_makes_at_most_two_graphs_over_a_runs_lengths(monkeypatch):
    """One to four 1024x768 images (Qwen2.5-VL: 999 tokens each) and smaller ones, L 351-4197, at the paper's
    micro-batch 1, through livr's own compiled flex (inductor, dynamic shapes, GQA): at most 2 graphs, and the
    outputs equal the eager reference. CPU forward only: torch has no flex backward on CPU, and torch 2.13's CPU
    flex template fails to compile GQA at batch > 1 (C++ error "cur_kvSplitSize9 was not declared", measured);
    CUDA compiles Triton templates instead (bench/gpu_check.py runs batch 8 there)."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from livr.backbones import FAMILIES
    from livr.model import flex

    monkeypatch.setenv("LIVR_FLEX_COMPILE", "1")
    flex._flex.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    fam = FAMILIES["qwen2_5_vl"]
    try:
        calls = []
        for images, tokens, batch in ((1, 256, 1), (1, 999, 1), (2, 700, 1), (3, 999, 1), (4, 999, 1), (2, 300, 1),
                                      (4, 1024, 1)):
            g = _groups(images, tokens, batch)
            gen = torch.Generator().manual_seed(g.shape[1])
            q, k, v = (torch.randn(batch, h, g.shape[1], 16, generator=gen) for h in (4, 2, 2))  # GQA 4:2
            bm = flex.block_mask(fam, g)
            calls.append((q, k, v, bm, flex.flex_forward(None, q, k, v, bm, scaling=0.25)[0]))
        graphs = counters["stats"]["unique_graphs"]  # (read first: eager flex_attention compiles a wrapper itself)
        assert 1 <= graphs <= 2, dict(counters["stats"])
        for q, k, v, bm, out in calls:
            want = flex_attention(q, k, v, block_mask=bm, scale=0.25, enable_gqa=True).transpose(1, 2)
            assert torch.allclose(out, want, atol=1e-4), (q.shape, (out - want).abs().max().item())
    finally:
        flex._flex.cache_clear()
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- kernels per part, checked before loading
def _tiny(backbone_cache, data_cache, tmp_path, **extra):
    from livr.config import load_config

    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **extra))


def test_auto_kernels_per_device_and_family(backbone_cache, data_cache, tmp_path):
    """auto: flex for Stage 1 on CUDA (sdpa for a family with its own mask rules, and on a CPU); the vision tower's
    FlashAttention only where flash-attn imports (not in this CPU stack: sdpa)."""
    from livr.backbones import FAMILIES
    from livr.model.attention import AttentionPlan, flash_available, resolve

    cfg = _tiny(backbone_cache, data_cache, tmp_path)
    assert cfg.model.attn_implementation == "auto" and cfg.model.attn_implementation_vision == "auto"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve(cfg, cpu, FAMILIES["qwen2_5_vl"]) == AttentionPlan("sdpa", "sdpa", "sdpa")
    plan = resolve(cfg, cuda, FAMILIES["qwen2_5_vl"])
    assert (plan.stage1, plan.stage2) == ("flex_attention", "flex_attention")
    assert plan.vision == ("flash_attention_2" if flash_available("flash_attention_2") else "sdpa")
    assert resolve(cfg, cuda, FAMILIES["gemma3"]).stage1 == "sdpa"  # bidirectional images, sliding windows
    cfg.model.attn_implementation, cfg.model.attn_implementation_stage2 = "eager", "sdpa"
    plan = resolve(cfg, cuda, FAMILIES["qwen3_vl"])
    assert (plan.stage1, plan.stage2) == ("eager", "sdpa")


def test_vision_tower_keeps_its_kernel_across_stage_switches(backbone_cache, data_cache, tmp_path):
    from livr.model.build import build_model

    lm = build_model(_tiny(backbone_cache, data_cache, tmp_path, **{"model.attn_implementation_vision": "eager"}))
    cfg = lm.model.get_base_model().config
    visual = lm.model.get_base_model().model.visual
    for name in ("sdpa", "eager", "flex_attention", "sdpa"):
        lm.set_attn_implementation(name)
        want = "livr_flex" if name == "flex_attention" else name
        assert cfg._attn_implementation == cfg.text_config._attn_implementation == want
        assert cfg.vision_config._attn_implementation == visual.config._attn_implementation == "eager", name


@pytest.mark.parametrize("key", ["model.attn_implementation_stage2", "model.attn_implementation_vision"])
def test_a_kernel_that_cannot_load_is_one_line_before_anything_loads(key, backbone_cache, data_cache, tmp_path):
    from livr.config import ConfigError
    from livr.training.train import train_worker

    fresh = tmp_path / "empty-cache"
    cfg = _tiny(str(fresh), data_cache, tmp_path, **{key: "flash_attention_2"})
    with pytest.raises(ConfigError) as e:
        train_worker(cfg)
    msg = str(e.value)
    assert "\n" not in msg and f"{key}='flash_attention_2'" in msg and "CUDA" in msg
    assert not fresh.exists() or not any(fresh.iterdir()), "nothing was materialised or loaded"


def test_evaluation_under_the_bottleneck_runs_a_kernel_that_takes_the_mask(backbone_cache, data_cache, tmp_path):
    """Stage 2 may run a kernel that takes no 4-D mask (FlashAttention): `eval.bottleneck` evaluates under Stage 1's
    kernel and restores Stage 2's. The stand-in for FlashAttention is an attention function that refuses a 4-D mask."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from livr.data.synthetic import generate_task
    from livr.model.attention import AttentionPlan
    from livr.model.build import build_model
    from livr.training.evaluate import evaluate_rows

    def no_4d_mask(module, q, k, v, mask, **kw):
        if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:
            raise RuntimeError("this kernel takes no 4-D mask")
        return sdpa_attention_forward(module, q, k, v, None if mask is None else mask, **kw)

    AttentionInterface.register("no_4d_mask", no_4d_mask)
    lm = build_model(_tiny(backbone_cache, data_cache, tmp_path))
    lm.attention = AttentionPlan("sdpa", "no_4d_mask", "sdpa")
    lm.set_attn_implementation("no_4d_mask")
    rows = generate_task("Counting", 3, seed=1)
    plain = evaluate_rows(lm, rows, batch_size=3)  # the 2-D path: this kernel is fine
    assert lm.attn_implementation() == "no_4d_mask"
    with pytest.raises(RuntimeError, match="no 4-D mask"):  # what FlashAttention would meet without the switch
        from livr.training.evaluate import generate
        generate(lm, [lm.builder.encode(r, with_answer=False) for r in rows], bottleneck=True)
    res = evaluate_rows(lm, rows, bottleneck=True, batch_size=3)
    assert lm.attn_implementation() == "no_4d_mask", "Stage 2's kernel is restored"
    assert res["n"] == plain["n"] == {"Counting": 3}


def test_plan_counts_evaluation_memory_and_says_which_phase_binds():
    """Qwen2.5-VL-3B at L 4200: evaluation holds a KV cache, one layer's prefill and the last position's logits
    (B·V, never the B·L·V of a full prefill: ~10 GB of bf16 at B 8); a large eval batch makes evaluation bind."""
    from livr.config import load_config
    from livr.tools.plan import GIB, format_plan, plan

    cfg = load_config(os.path.join(ROOT, "configs/paper/qwen2.5-vl-3b/Jigsaw_livr.yaml"), ["eval.batch_size=8"])
    p = plan(cfg, seq_len=4200)
    c, ev = p["counts"], p["evaluation"]["no_checkpointing"]
    assert (c["layers"], c["kv_dim"], c["vocab"]) == (36, 256, 151936)
    assert ev["kv_cache"] == 36 * 2 * 8 * (4200 + cfg.eval.max_new_tokens) * 256 * 2
    assert ev["logits"] == 8 * 151936 * (2 + 4) < 0.01 * GIB  # full-prefill logits would be 8·4200·151936·2 ≈ 9.5 GiB
    train = p["configured"]["no_checkpointing"]
    assert train["binds"] == "training" and train["total"] == train["train_total"] >= train["eval_total"]
    assert "evaluating (batch 8" in format_plan(p)
    big = plan(load_config(os.path.join(ROOT, "configs/paper/qwen2.5-vl-3b/Jigsaw_livr.yaml"),
                           ["eval.batch_size=64", "model.attn_implementation=eager"]), seq_len=4200)
    b = big["configured"]["no_checkpointing"]
    assert b["binds"] == "evaluation" and b["total"] == b["eval_total"] > b["train_total"]
    assert "eval.batch_size=64" in big["recommendation"]


def test_zero3_refusals_before_the_model_loads(backbone_cache, data_cache, tmp_path):
    """ZeRO-3 + gradient checkpointing on a DeepSpeed older than 0.19.3, and a row without an image under ZeRO-3
    (its rank would skip the partitioned vision gather the others wait in): one line each, nothing loaded."""
    from livr.config import ConfigError
    from livr.data.loader import Rows
    from livr.data.synthetic import generate_task
    from livr.data.tasks import DataError
    from livr.training.ds_setup import check_zero3, check_zero3_rows

    cfg = _tiny(backbone_cache, data_cache, tmp_path, **{"model.gradient_checkpointing": True})
    z3, z2 = {"zero_optimization": {"stage": 3}}, {"zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match=r"deepspeed >= 0.19.3 \(this is 0.19.2"):
        check_zero3(cfg, z3, version="0.19.2")
    check_zero3(cfg, z3, version="0.19.3+abc")
    check_zero3(cfg, z2, version="0.15.0")
    check_zero3(cfg, z3)  # the installed one (0.19.8)
    import datasets

    rows = generate_task("Counting", 4, seed=0)
    text_only = {**rows[2], "image_1": None, "idx": "Counting_7"}
    arrow = datasets.Dataset.from_list(rows[:2] + [text_only])
    assert Rows([rows[:2], arrow]).first_without_image() == 4
    check_zero3_rows({"train": Rows([rows]), "val": Rows([datasets.Dataset.from_list(rows[:2])])})
    with pytest.raises(DataError) as e:
        check_zero3_rows({"train": Rows([rows]), "val": Rows([rows[:1], arrow])})
    assert "\n" not in str(e.value) and "val split: task Counting idx=Counting_7 has no image" in str(e.value)


@pytest.mark.slow
def test_process_group_timeout_reaches_ray_and_the_one_process_group(backbone_cache, data_cache, tmp_path):
    """distributed.timeout_s (default 2 h: local rank 0 may download a backbone while the others wait) is Ray
    Train's TorchConfig timeout, and the timeout of the group livr makes itself."""
    from livr.cluster.ray_train import make_trainer
    from livr.config import ConfigError, load_config

    cfg = _tiny(backbone_cache, data_cache, tmp_path, **{"distributed.num_workers": 2, "distributed.timeout_s": 321})
    assert load_config(None, []).distributed.timeout_s == 7200
    assert make_trainer(cfg).backend_config.timeout_s == 321
    with pytest.raises(ConfigError, match="distributed.timeout_s"):
        _tiny(backbone_cache, data_cache, tmp_path, **{"distributed.timeout_s": 0})
    code = ("import os, datetime, torch.distributed as dist\n"
            "from livr.config import load_config\nfrom livr.training.train import setup_distributed\n"
            f"cfg = load_config(None, {tiny_overrides(backbone_cache, data_cache, tmp_path)!r} + "
            "['distributed.deepspeed=deepspeed_configs/zero2.json', 'distributed.timeout_s=321'])\n"
            "ctx = setup_distributed(cfg)\n"
            "from torch.distributed.distributed_c10d import _get_default_group\n"
            "import torch\nopts = _get_default_group()._get_backend(torch.device('cpu')).options\n"
            "print(ctx.world, dist.get_world_size(), opts._timeout.total_seconds())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-3:] == ["1", "1", "321.0"], r.stdout
