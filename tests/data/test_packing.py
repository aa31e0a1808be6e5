"""Packing under the bottleneck (livr/data/packing.py): a packed step's loss and gradients equal the unpacked step's,
no attention across packed examples (leak probe), no recurrent state across them (Qwen3.5's Gated DeltaNet layers),
the bottleneck per packed example (K = 0 invariance), first-fit decreasing, the flex BlockMask equal to the 4-D mask,
one-line config errors; 2 ranks under DDP, ZeRO-2 and ZeRO-3."""
import os

import pytest
import torch
from conftest import tiny_overrides, zero3_json

from livr.config import ConfigError, load_config
from livr.data.packing import collate_packed, plan_packs
from livr.data.sequence import collate
from livr.data.synthetic import generate_task
from livr.method.groups import ANSWER, IMAGE
from livr.method.mask import packed_allowed
from livr.model.flex import packed_block_mask
from livr.training.distributed import teardown_distributed


def _rows():
    # 1 or 3 images, answers of 1 to 3 tokens (as tests/training/test_spec_train.py's gradient rows), five of them: packs of
    # unequal sizes and labelled-token counts (a per-micro-batch normalisation would show)
    return (generate_task("Counting", 2, seed=1, mode="open", min_count=9, max_count=12)
            + generate_task("Visual_Similarity", 1, seed=1) + generate_task("Counting", 2, seed=2, mode="open"))


def _six_rows():
    return _rows() + generate_task("Counting", 1, seed=3, mode="open")


def _lm(backbone_cache, data_cache, tmp_path, backbone, **extra):
    from livr.model.build import build_model

    over = {"model.backbone": backbone, "lora.dropout": 0.0, "train.micro_batch_size": 1, "train.grad_accum": 5,
            **extra}
    cfg = load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **over))
    return cfg, build_model(cfg)


def _step(cfg, lm, micro, bottleneck, rank=0, world=1):
    """One real train_step over `micro`: (loss, the gradients the optimizer steps with)."""
    from livr.model.build import param_groups
    from livr.training.engine import TorchEngine
    from livr.training.train import Context, Stage, train_step

    opt = torch.optim.AdamW(param_groups(lm.model, 0.01), lr=1e-3)
    grads = {}
    opt.register_step_pre_hook(lambda o, a, k: grads.update(
        {n: p.grad.detach().clone() for n, p in lm.model.named_parameters() if p.grad is not None}))
    stage = Stage("stage1" if bottleneck else "stage2", bottleneck, 4, "sdpa")
    engine = TorchEngine(lm.model, opt, cfg, rank, world)
    train_step(lm, engine, cfg, stage, {"step": 1}, micro, Context(rank, world, rank))
    return engine.last.loss, grads  # the step's loss, summed over ranks


def _ds_step(cfg, lm, micro, rank, world):
    """One real train_step through livr's DeepSpeed engine: (loss, the whole gradients ZeRO steps with, read from
    its partitions at the boundary, just before its optimizer step, clipped as the torch engine's are)."""
    from deepspeed.utils import safe_get_full_grad

    from livr.training.engine import make_engine
    from livr.training.train import Context, Stage, train_step

    engine = make_engine(lm, cfg, rank, world)
    grads, step, ds = {}, engine.engine.step, engine.engine

    def step_capturing(*a, **k):
        if ds.is_gradient_accumulation_boundary():
            grads.update({n: safe_get_full_grad(p).detach().clone() for n, p in engine.model.named_parameters()
                          if p.requires_grad})
        return step(*a, **k)

    ds.step = step_capturing
    train_step(lm, engine, cfg, Stage("stage1", True, 4, "sdpa"), {"step": 1}, micro, Context(rank, world, rank))
    norm = torch.stack([g.norm() for g in grads.values()]).norm()  # clipped as torch's clip_grad_norm_ would
    clip = min(1.0, cfg.train.max_grad_norm / (float(norm) + 1e-6))
    return engine.last.loss, {n: g * clip for n, g in grads.items()}, ds.global_steps


def _packed_worker(rank, world, init, overrides, max_tokens, out, engines=("torch",)):
    """One rank of a 2-rank packed step: its share of the global batch (the unpacked step's rows), packed; once per
    engine ("torch", or a DeepSpeed JSON's path)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from livr.data.loader import micro_batches
    from livr.data.packing import step_rows
    from livr.model.build import build_model

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # as Ray Train / torchrun set them
    try:
        if engines != ("torch",):
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)  # wraps this process group
        for e, engine in enumerate(engines):
            ds = [] if engine == "torch" else [f"distributed.deepspeed={engine}"]
            cfg = load_config(None, [*overrides, *ds])
            torch.manual_seed(0)
            lm = build_model(cfg)
            items = [lm.builder.encode(r) for r in _six_rows()]
            (rows,) = step_rows(micro_batches(6, seed=0, stage=0, start_step=0, steps=1, micro_batch=1, accum=3,
                                              world=world, rank=rank), 3)
            micro = collate_packed([dict(items[i]) for i in rows], lm.tokenizer.pad_token_id, max_tokens)
            if ds:
                loss, grads, steps = _ds_step(cfg, lm, micro, rank, world)
                grads["optimizer_steps"] = torch.tensor(steps)
            else:
                loss, grads = _step(cfg, lm, micro, True, rank, world)
            save_file({**grads, "loss": torch.tensor(loss), "packs": torch.tensor(len(micro))}, f"{out}{e}.rank{rank}")
    finally:
        teardown_distributed()


@pytest.mark.slow
def test_two_ranks_packed_equal_one_rank_unpacked(backbone_cache, data_cache, tmp_path):
    """Ranks with different numbers of packed micro-batches give the one-rank unpacked step's loss and gradients:
    under DDP (it syncs at each rank's last one) and under DeepSpeed ZeRO-2 and ZeRO-3 (the rank with fewer packs
    runs a weight-0 filler, so that both join every collective; the step is applied once, at livr's boundary)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    cfg, lm = _lm(backbone_cache, data_cache, tmp_path, "tiny-qwen2.5-vl")
    items = [lm.builder.encode(r) for r in _six_rows()]
    loss_u, grads_u = _step(cfg, lm, [collate([it], lm.tokenizer.pad_token_id) for it in items], True)
    from livr.data.loader import micro_batches
    from livr.data.packing import step_rows

    pairs = [sum(items[i]["input_ids"].shape[0] for i in next(step_rows(micro_batches(
        6, seed=0, stage=0, start_step=0, steps=1, micro_batch=1, accum=3, world=2, rank=r), 3))) for r in (0, 1)]
    assert pairs[0] != pairs[1]
    over = tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "lora.dropout": 0.0, "train.micro_batch_size": 1, "train.grad_accum": 3, "data.packing": True,
        "data.max_tokens": min(pairs)})
    out = str(tmp_path / "packed")
    engines = ("torch", "deepspeed_configs/zero2.json", zero3_json(tmp_path))
    mp.spawn(_packed_worker, nprocs=2, join=True, args=(2, str(tmp_path / "pg"), over, min(pairs), out, engines))
    for e, engine in enumerate(engines):
        got = [load_file(f"{out}{e}.rank{r}") for r in (0, 1)]
        # one rank packs its three rows into one micro-batch, the other into two: neither is the accumulation's 3
        assert sorted(int(g.pop("packs")) for g in got) == [1, 2], engine
        for g in got:
            if engine != "torch":  # livr's boundary, not DeepSpeed's count of 2 micro-batches: one step, applied
                assert int(g.pop("optimizer_steps")) == 1, engine
            assert abs(g.pop("loss").item() - loss_u) <= 1e-5 * loss_u, engine
            assert g.keys() == grads_u.keys(), engine
            for n, ref in grads_u.items():
                assert (g[n] - ref).abs().max() <= 1e-5 * max(ref.abs().max(), 1e-8), (engine, n)


@pytest.mark.parametrize("backbone,bottleneck,extra", [
    ("tiny-qwen2.5-vl", True, {}), ("tiny-qwen2.5-vl", False, {}), ("tiny-llava-onevision", True, {}),
    ("tiny-llava-onevision", False, {}), ("tiny-qwen2.5-vl", True, {"model.cache_vision": True}),
    ("tiny-gemma3", True, {}),  # (its own rule: images both ways, sliding windows; also passes Stage 2, Qwen3-VL)
    # hybrid: each example's slice through the Gated DeltaNet layers from a fresh state (two recurrences in Stage 1)
    ("tiny-qwen3.5", True, {}), ("tiny-qwen3.5", False, {}), ("tiny-qwen3.5-moe", True, {})])
def test_packed_step_equals_unpacked(backbone, bottleneck, extra, backbone_cache, data_cache, tmp_path):
    cfg, lm = _lm(backbone_cache, data_cache, tmp_path, backbone, **extra)
    items = [lm.builder.encode(r) for r in _rows()]
    lengths = sorted(it["input_ids"].shape[0] for it in items)
    pad = lm.tokenizer.pad_token_id
    packed = collate_packed([dict(it) for it in items], pad, lengths[-1] + lengths[0])
    assert 1 < len(packed) < len(items) and all(b["input_ids"].shape[0] == 1 for b in packed)
    assert len({int((b["labels"] != -100).sum()) for b in packed}) > 1  # packs of unequal labelled-token counts
    by_len = {}
    for it in items:
        by_len.setdefault(it["input_ids"].shape[0], []).append(it["position_ids"])
    for b in packed:  # positions restart at every example: each example's own, from the family's function alone
        for k, n in enumerate(b["seq_lens"].tolist()):
            pos = b["position_ids"][..., 0, :][..., b["segments"][0] == k]
            assert pos.min() == 0 and any(torch.equal(pos, p) for p in by_len[n])
    loss_u, grads_u = _step(cfg, lm, [collate([it], pad) for it in items], bottleneck)
    if extra:  # the vision cache: the packed batch carries every image's key, in order
        assert all("image_keys" in b for b in packed) and lm.vision_cache is not None
    _, lm = _lm(backbone_cache, data_cache, tmp_path, backbone, **extra)  # the same initial weights (seeded LoRA)
    loss_p, grads_p = _step(cfg, lm, packed, bottleneck)
    assert abs(loss_p - loss_u) <= 1e-5 * abs(loss_u)
    assert grads_u.keys() == grads_p.keys() and len(grads_u) > 10
    for n, g in grads_u.items():
        assert (grads_p[n] - g).abs().max() <= 1e-5 * max(g.abs().max(), 1e-8), n


def _other_pixels(item, seed):
    px = item["pixel_values"]
    return {**item, "pixel_values": torch.randn(px.shape, generator=torch.Generator().manual_seed(seed)).to(px.dtype)}


def _assert_examples_apart(lm, latents: int, other_a: bool = True):
    """Leak probe on the packed row [A, B] (A: 3 images, B: 1): A's pixels or tokens move nothing of B's logits
    (both stages, `other_a`); B's own image moves B's prompt and answer logits, except under Stage 1 with no
    latents (the bottleneck per example). Returns (A, B) encoded."""
    rows = _rows()
    a, b = lm.builder.encode(rows[2]), lm.builder.encode(rows[0])
    pad, na = lm.tokenizer.pad_token_id, a["input_ids"].shape[0]

    def logits(first, second, bottleneck):
        (batch,) = collate_packed([dict(first), dict(second)], pad, 10**6)
        with torch.no_grad():
            return lm.forward(batch, bottleneck)[0, na:]

    text_a = {**a, "input_ids": torch.where(a["groups"] == IMAGE, a["input_ids"], (a["input_ids"] + 7) % 500)}
    blind = torch.isin(b["groups"], torch.tensor([ANSWER, 2]))  # B's answer and prompt rows
    for bottleneck in (True, False):
        ref = logits(a, b, bottleneck)
        for changed in (_other_pixels(a, 1), text_a) if other_a else ():
            assert (logits(changed, b, bottleneck) - ref).abs().max() < 1e-6
        moved = (logits(a, _other_pixels(b, 2), bottleneck) - ref)[blind].abs().max()
        if bottleneck and latents == 0:
            assert moved < 1e-6  # the only path from B's pixels to its answer is the latents: none here
        else:
            assert moved > 1e-4  # the latents (or the causal mask) carry B's image
    return a, b


def test_no_attention_across_packed_examples_and_bottleneck_per_example(backbone_cache, data_cache, tmp_path):
    """Leak probe (tiny-qwen2.5-vl): example A's pixels or tokens move nothing of example B (both stages); under the
    Stage-1 mask with K = 0, B's prompt and answer logits ignore B's own image, with K > 0 they do not."""
    for k in (0, 4):
        _, lm = _lm(backbone_cache, data_cache, tmp_path / f"k{k}", "tiny-qwen2.5-vl", **{"latents.num_latents": k})
        lm.model.eval()
        _assert_examples_apart(lm, k, other_a=k == 4)


def test_no_state_across_packed_examples_in_gated_deltanet_layers(backbone_cache, data_cache, tmp_path):
    """Leak probe for the recurrent layers (tiny-qwen3.5: 3 Gated DeltaNet layers, 1 full attention): example A's
    pixels or tokens move nothing of example B's logits (both stages); under Stage 1 with K = 0, B's prompt and
    answer logits ignore B's own image (the bottleneck holds per example), under Stage 2 they do not. A packed row
    with a cache is refused."""
    _, lm = _lm(backbone_cache, data_cache, tmp_path, "tiny-qwen3.5", **{"latents.num_latents": 0})
    lm.model.eval()
    a, b = _assert_examples_apart(lm, 0)
    (batch,) = collate_packed([dict(a), dict(b)], lm.tokenizer.pad_token_id, 10**6)
    with pytest.raises(RuntimeError, match="a packed row .* runs without a cache"), torch.no_grad():
        lm.model(**lm.model_inputs(batch, True), use_cache=True)  # training only


def test_first_fit_decreasing():
    packs = plan_packs([5, 9, 3, 7, 12, 2], 10)
    assert sorted(i for p in packs for i in p) == list(range(6))
    assert [4] in packs  # 12 > 10: alone
    assert all(sum([5, 9, 3, 7, 12, 2][i] for i in p) <= 10 for p in packs if p != [4])
    assert len(packs) == 4  # 12 | 9 | 7+3 | 5+2
    assert plan_packs([4, 4, 4], 100) == [[0, 1, 2]]


def test_flex_block_mask_equals_the_4d_mask():
    from livr.backbones.families.qwen2_5_vl import Qwen2_5_VL
    from livr.model import flex

    fam = Qwen2_5_VL()
    groups = torch.tensor([[0, 1, 1, 2, 3, 4, 4, 0, 1, 2, 2, 4, 5, 5]])
    segments = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1]])
    for bottleneck in (True, False):
        want = packed_allowed(fam, None, groups, segments, bottleneck)
        got = flex.allowed(packed_block_mask(fam, groups, segments, bottleneck))[:, 0]
        assert torch.equal(got, want)
        assert not want[0, 8:12, :7].any()  # example 2 sees nothing of example 1
        assert want[0, 5, 1] != bottleneck  # answer row x image column: blocked in Stage 1 only


@pytest.mark.parametrize("extra,needle", [
    ({"data.max_tokens": 0}, "data.max_tokens=0"),
    ({"model.attn_implementation_stage2": "flash_attention_2"}, "FlashAttention"),
])
def test_packing_config_errors(extra, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(None, [f"{k}={v}" for k, v in {"data.packing": True, **extra}.items()])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("backbone,family,key", [("tiny-qwen3.5", "qwen3_5", "model.attn_implementation_stage2"),
                                                ("tiny-gemma3", "gemma3", "model.attn_implementation")])
def test_packing_with_flex_refused_where_a_block_mask_cannot_carry_the_family(backbone, family, key, tmp_path):
    """Packing of a hybrid family works under sdpa; flex for any stage of a family with its own rules (Qwen3.5's dict
    per layer type, Gemma 3's two-way images) is refused before anything loads, in one line."""
    from livr.backbones.preflight import check_before_loading

    over = {"data.packing": True, "model.backbone": backbone, "model.cache_dir": str(tmp_path)}
    check_before_loading(load_config(None, [f"{k}={v}" for k, v in over.items()]))  # sdpa: packs
    with pytest.raises(ConfigError, match=f"data.packing.*flex_attention: family {family} ") as e:
        check_before_loading(load_config(None, [f"{k}={v}" for k, v in {**over, key: "flex_attention"}.items()]))
    assert "\n" not in str(e.value)


def test_flex_packed_forward_equals_sdpa(backbone_cache, data_cache, tmp_path):
    """The flex path of a packed row (BlockMask with document ids; forward only: CPU has no flex backward)."""
    _, lm = _lm(backbone_cache, data_cache, tmp_path, "tiny-qwen2.5-vl")
    _, lf = _lm(backbone_cache, data_cache, tmp_path, "tiny-qwen2.5-vl", **{"model.attn_implementation": "flex_attention"})
    items = [lm.builder.encode(r) for r in _rows()[:3]]
    (batch,) = collate_packed(items, lm.tokenizer.pad_token_id, 10**6)
    assert lf.attn_implementation() == "livr_flex"
    for bottleneck in (True, False):
        with torch.no_grad():
            assert torch.allclose(lf.forward(batch, bottleneck), lm.forward(batch, bottleneck), atol=1e-5)
