"""LIVR_SPEC §3 inside the real loop: what `train_worker` itself builds and does, observed from outside.

The optimizer is observed by substituting a recording AdamW (its real param groups and the learning rate
of every step), the masks by a forward hook on the backbone; the schedule is compared with transformers'
`get_cosine_schedule_with_warmup`, resume with an uninterrupted run, and N-rank gradients with one rank's
accumulation over a real gloo process group.
"""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_overrides
from safetensors.torch import load_file, save_file

import livr.training.train
from livr.config import load_config
from livr.training.distributed import teardown_distributed

IMAGE_TOKEN = "<|image_pad|>"


def _cfg(backbone_cache, data_cache, tmp_path, **extra):
    return load_config(None, tiny_overrides(backbone_cache, data_cache, tmp_path, **{"tracking.enabled": False, **extra}))


def _hf_trace(lr: float, warmup_ratio: float, total: int) -> list[float]:
    """The learning rate of each optimizer step under transformers' scheduler, stepped as the HF Trainer does."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(warmup_ratio * total), total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_train_worker_optimizer_schedule_and_stage_masks(backbone_cache, data_cache, tmp_path, monkeypatch):
    cfg = _cfg(backbone_cache, data_cache, tmp_path, name="spec", **{
        "train.stage1_steps": 4, "train.stage2_steps": 6, "train.micro_batch_size": 2, "train.grad_accum": 2,
        "optim.warmup_ratio": 0.25, "optim.lr": 1e-2, "optim.weight_decay": 0.03, "latents.num_latents": 3})
    optimizers, forwards = [], []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            self.lrs = []
            optimizers.append(self)
            self.register_step_pre_hook(lambda opt, a, k: opt.lrs.append([g["lr"] for g in opt.param_groups]))

    real_build = livr.training.train.build_model

    def build(*a, **kw):
        lm = real_build(*a, **kw)

        def hook(module, args, kwargs):
            if module.training:
                forwards.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))

        lm.model.get_base_model().register_forward_pre_hook(hook, with_kwargs=True)
        build.lm = lm
        return lm

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(livr.training.train, "build_model", build)
    livr.training.train.train_worker(cfg)

    # the optimizer train_worker really built: every trainable tensor once; latent rows without weight decay
    (opt,) = optimizers
    model = build.lm.model
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(trainable) and len(in_groups) == len(set(in_groups))
    hidden = model.get_input_embeddings().weight.shape[1]
    for g in opt.param_groups:
        for p in g["params"]:
            if tuple(p.shape) == (4, hidden) and "lora_" not in names[id(p)]:  # the K+1 latent rows
                assert g["weight_decay"] == 0.0, names[id(p)]
            else:
                assert "lora_" in names[id(p)] and g["weight_decay"] == 0.03, names[id(p)]
    assert sum(1 for g in opt.param_groups for p in g["params"] if g["weight_decay"] == 0.0) == 1
    assert (opt.betas if hasattr(opt, "betas") else opt.defaults["betas"]) == (0.9, 0.999)
    assert opt.defaults["eps"] == 1e-8

    # the learning rate of every step, every group: warm-up + cosine restarted per stage, as transformers has it
    expected = _hf_trace(1e-2, 0.25, 4) + _hf_trace(1e-2, 0.25, 6)
    assert len(opt.lrs) == 10
    for step, (lrs, want) in enumerate(zip(opt.lrs, expected)):
        assert lrs == pytest.approx([want] * len(lrs), abs=1e-12), f"step {step}"

    # Stage 1 trains under the bottleneck (answer rows blind to every image column, latents see them),
    # Stage 2 under the plain causal path
    assert len(forwards) == 20  # (4 + 6) steps x 2 micro-batches
    image = build.lm.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    end = build.lm.tokenizer.convert_tokens_to_ids("<livr_latent_end>")
    for i, (ids, mask) in enumerate(forwards):
        if i >= 8:
            assert mask.dim() == 2, f"Stage-2 micro-batch {i} got a {mask.dim()}-D mask"
            continue
        assert mask.dim() == 4, f"Stage-1 micro-batch {i} got a {mask.dim()}-D mask"
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            images = [j for j, t in enumerate(row) if t == image]
            delimiter = row.index(end)
            answer_rows = [j for j in range(delimiter, len(row)) if row[j] != build.lm.tokenizer.pad_token_id]
            seen = mask[b, 0][answer_rows][:, images]
            assert (seen == torch.finfo(mask.dtype).min).all(), "an answer row sees the image in Stage 1"
            assert (mask[b, 0][delimiter - 1, images] == 0).all(), "the last latent sees the image"


def _final(run_dir):
    return load_file(os.path.join(run_dir, "checkpoints", "last", "trainable.safetensors"))


@pytest.mark.parametrize("packing", [False, True])
def test_resume_mid_stage_equals_an_uninterrupted_run(packing, backbone_cache, data_cache, tmp_path, monkeypatch):
    """Killed mid-epoch in Stage 1 and again mid-Stage 2, resumed each time: the same weights, bit for bit,
    as the run that was never interrupted (dropout 0: issue 12 adds the RNG state for dropout > 0); also with each
    step's rows packed (data.packing, a budget that makes 2-3 packed rows of a step's 4 examples)."""
    # 16 rows / batch 4 = 4 steps per epoch: Stage 1 = 1.5 epochs (validations at steps 4 and 6), Stage 2 = 3 steps
    extra = {"train.stage1_steps": 6, "train.stage2_steps": 3, "lora.dropout": 0.0, "distributed.checkpoint_every": 1,
             "optim.lr": 1e-2, "eval.splits": "[val]"}
    if packing:
        extra.update({"data.packing": True, "data.max_tokens": 250})
        seen = []
        real = livr.training.train.train_step
        monkeypatch.setattr(livr.training.train, "train_step", lambda lm, e, c, st, s_, micro, ctx: (
            seen.append(len(micro)), real(lm, e, c, st, s_, micro, ctx))[1])
    whole = _cfg(backbone_cache, data_cache, tmp_path, name="whole", **extra)
    cut = _cfg(backbone_cache, data_cache, tmp_path, name="cut", **extra)
    ref = livr.training.train.train_worker(whole)
    for at in ("2", "7"):  # step 2 = mid-epoch of Stage 1; step 7 = the middle of Stage 2
        monkeypatch.setenv("LIVR_FAIL_AT_STEP", at)
        with pytest.raises(RuntimeError, match=f"injected failure at step {at}"):
            livr.training.train.train_worker(cut)
    monkeypatch.delenv("LIVR_FAIL_AT_STEP")
    got = livr.training.train.train_worker(cut)
    assert got["resumed_from"] == [1, 6] and got["global_step"] == ref["global_step"] == 9
    a, b = _final(whole.run_dir), _final(cut.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the same validations at the same steps, the same best selection, the same selected weights
    assert got["best_val_accuracy"] == ref["best_val_accuracy"]
    state = {}
    for d in (whole.run_dir, cut.run_dir):
        with open(os.path.join(d, "checkpoints", "last", "state.json")) as f:
            state[d] = json.load(f)
    assert state[whole.run_dir]["history"] == state[cut.run_dir]["history"]
    assert [h["step"] for h in state[cut.run_dir]["history"]] == [4, 6, 9]  # each epoch's end, then each stage's
    assert state[whole.run_dir]["best_at"] == state[cut.run_dir]["best_at"]
    best = [load_file(os.path.join(d, "checkpoints", "best.safetensors")) for d in (whole.run_dir, cut.run_dir)]
    assert all(torch.equal(best[0][k], best[1][k]) for k in best[0])
    if packing:  # each step really ran as packed rows: fewer forwards than its 4 examples, more than one
        assert seen and all(1 < n < 4 for n in seen), seen


def test_plan_stages_from_epochs():
    """Stage lengths: epochs x steps per epoch, per stage (explicit *_steps override them)."""
    from livr.training.train import plan_stages

    cfg = load_config(None, ["train.stage1_epochs=2", "train.stage2_epochs=3", "train.sft_epochs=4"])
    assert [(s.name, s.bottleneck, s.steps) for s in plan_stages(cfg, 5)] == [("stage1", True, 10), ("stage2", False, 15)]
    cfg = load_config(None, ["train.stage1_epochs=2", "train.stage2_epochs=3", "train.stage2_steps=7"])
    assert [s.steps for s in plan_stages(cfg, 5)] == [10, 7]
    cfg = load_config(None, ["train.mode=sft", "train.sft_epochs=4"])
    assert [(s.name, s.bottleneck, s.steps) for s in plan_stages(cfg, 5)] == [("sft", False, 20)]


@pytest.mark.parametrize("select", ["best", "last"])
def test_model_selection(select, backbone_cache, data_cache, tmp_path, monkeypatch):
    """train.select=best restores the weights of the best validation (here the first: the second is worse);
    train.select=last keeps the final weights. What the run saves and tests is the selected model."""
    from livr.training.checkpoint import trainable_state

    scores = iter([0.9, 0.1, 0.5])  # val after Stage 1, val after Stage 2, then the test evaluation

    def fake_evaluate(lm, cfg, splits, names, bottleneck, ctx, quiet, loaders):
        acc = next(scores)
        return {n: {"accuracy": {"Counting": acc}, "mean": acc, "predictions": []} for n in names}

    saved = {}
    real_save = livr.training.train.save_run_artifacts
    monkeypatch.setattr(livr.training.train, "_evaluate", fake_evaluate)
    monkeypatch.setattr(livr.training.train, "save_run_artifacts",
                        lambda lm, run_dir: (saved.update(trainable_state(lm.model)), real_save(lm, run_dir)))
    cfg = _cfg(backbone_cache, data_cache, tmp_path, name=f"select-{select}", **{
        "train.stage1_steps": 2, "train.stage2_steps": 2, "optim.lr": 1e-2, "train.select": select,
        "eval.splits": "[val]"})
    result = livr.training.train.train_worker(cfg)
    assert result["best_val_accuracy"] == 0.9
    ckpt = os.path.join(cfg.run_dir, "checkpoints")
    want = load_file(os.path.join(ckpt, "best.safetensors") if select == "best" else os.path.join(ckpt, "last", "trainable.safetensors"))
    other = load_file(os.path.join(ckpt, "last", "trainable.safetensors") if select == "best" else os.path.join(ckpt, "best.safetensors"))
    assert any(not torch.equal(want[k], other[k]) for k in want), "best and last must differ for this test to mean anything"
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- N ranks = 1 rank x accumulation
def _grad_rows():
    from livr.data.synthetic import generate_task

    # unequal micro-batches: 1 or 3 images; answers of 1 to 3 tokens + end-of-turn (letters, numbers up to 12)
    return (generate_task("Counting", 2, seed=1, mode="open", min_count=9, max_count=12)
            + generate_task("Visual_Similarity", 1, seed=1) + generate_task("Counting", 1, seed=2, mode="open"))


def _step_grads(overrides: list[str], rank: int, world: int) -> tuple[dict, float]:
    """One train_step of the real loop on this rank: the gradients the optimizer steps with, and the loss."""
    from livr.data.loader import micro_batches
    from livr.data.sequence import collate
    from livr.model.build import build_model, param_groups
    from livr.training.engine import TorchEngine
    from livr.training.train import Context, Stage, train_step

    cfg = load_config(None, overrides)
    lm = build_model(cfg)
    opt = torch.optim.AdamW(param_groups(lm.model, 0.01), lr=1e-3)
    grads = {}
    opt.register_step_pre_hook(lambda o, a, k: grads.update(
        {n: p.grad.detach().clone() for n, p in lm.model.named_parameters() if p.grad is not None}))
    engine = TorchEngine(lm.model, opt, cfg, rank, world)
    if world > 1:  # bucketed DDP all-reduce, not one blocking call per parameter
        assert isinstance(engine.forward_module, torch.nn.parallel.DistributedDataParallel)
    items = [lm.builder.encode(r) for r in _grad_rows()]
    t = cfg.train
    micro = [collate([items[i] for i in idx], lm.tokenizer.pad_token_id) for idx in micro_batches(
        len(items), seed=0, stage=0, start_step=0, steps=1, micro_batch=t.micro_batch_size, accum=t.grad_accum,
        world=world, rank=rank)]
    train_step(lm, engine, cfg, Stage("stage1", True, 4, "sdpa"), {"step": 1}, micro, Context(rank, world, rank))
    return grads, engine.last.loss  # the step's loss, summed over the ranks


def _grad_worker(rank: int, world: int, init: str, jobs: list[tuple[list[str], str]]) -> None:
    """Each job's step on this rank (one process group, one spawn for every job): gradients and loss to its file."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        for overrides, out in jobs:
            grads, loss = _step_grads(overrides, rank, world)
            save_file({**grads, "loss": torch.tensor(loss)}, f"{out}.rank{rank}")
    finally:
        teardown_distributed()


def _hand_loss(overrides: list[str]) -> float:
    """The global-batch loss from full logits, by hand: total NLL of every labelled token / their count."""
    from livr.data.sequence import collate
    from livr.model.build import build_model

    lm = build_model(load_config(None, overrides))
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in _grad_rows():
            b = collate([lm.builder.encode(r)], lm.tokenizer.pad_token_id)
            logp = torch.log_softmax(lm.forward(b, True)[0].double(), -1)
            for t in (b["labels"][0] != -100).nonzero().flatten().tolist():
                nll -= logp[t - 1, b["labels"][0, t]].item()
                count += 1
    return nll / count


@pytest.mark.slow
def test_gradient_is_the_global_token_mean_for_any_batching(backbone_cache, data_cache, tmp_path):
    """Answers of unequal token lengths: micro-batch 4 x accumulation 1, 1 x 4, 2 x 2 and 2 ranks x (2 x 1)
    and 2 ranks x (1 x 2) give the same gradient (the per-token mean over the whole global batch)."""
    base = tiny_overrides(backbone_cache, data_cache, tmp_path, **{
        "lora.dropout": 0.0, "train.max_grad_norm": 1e9, "latents.num_latents": 2})
    from livr.model.build import build_model

    lm = build_model(load_config(None, base))
    lengths = {int((lm.builder.encode(r)["labels"] != -100).sum()) for r in _grad_rows()}
    assert len(lengths) >= 2, "the rows must have answers of different token lengths"
    runs = {f"mb{mb}xacc{acc}": _step_grads(base + [f"train.micro_batch_size={mb}", f"train.grad_accum={acc}"], 0, 1)
            for mb, acc in ((4, 1), (1, 4), (2, 2))}
    two = [(base + [f"train.micro_batch_size={mb}", f"train.grad_accum={acc}"], str(tmp_path / f"w2_mb{mb}"), mb, acc)
           for mb, acc in ((2, 1), (1, 2))]
    mp.spawn(_grad_worker, nprocs=2, join=True, args=(2, str(tmp_path / "pg"), [(o, out) for o, out, _, _ in two]))
    for _, out, mb, acc in two:
        for rank in (0, 1):
            got = load_file(f"{out}.rank{rank}")
            runs[f"2 ranks x mb{mb}xacc{acc} (rank {rank})"] = (got, got.pop("loss").item())
    ref_grads, ref_loss = runs.pop("mb4xacc1")
    assert ref_loss == pytest.approx(_hand_loss(base), abs=1e-5)
    assert any(v.abs().sum() > 0 for v in ref_grads.values())
    for name, (grads, loss) in runs.items():
        assert loss == pytest.approx(ref_loss, abs=1e-6), name
        assert grads.keys() == ref_grads.keys(), name
        for k in grads:
            assert torch.allclose(grads[k], ref_grads[k], atol=1e-6, rtol=1e-5), (name, k, (grads[k] - ref_grads[k]).abs().max().item())
