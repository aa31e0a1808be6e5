"""The first run on a GPU, in one command (at most ~8 minutes on one H100/H200):

    python bench/gpu_check.py [--depth 4] [--skip-tests] [--images 4]

1. The tests that exercise the GPU paths when CUDA is present (flex_attention, the frozen-vision cache, bf16,
   livr's kernel choices): `pytest tests/model/test_flex.py tests/model/test_vision_cache.py tests/model/test_gpu_readiness.py`
   (their models take `model.device=auto`, i.e. cuda here).
2. `size-qwen2.5-vl-3b` (Qwen2.5-VL-3B's real widths, random weights, offline) cut to `--depth` decoder layers and
   vision blocks, built by livr (LoRA + 16 latents, bf16) on one BLINK-like row of `--images` 1024x768 images
   (L ~ 4,200 at 4 images): one optimizer-free training step (forward + backward) as SFT (causal, sdpa), as
   Stage 1 with sdpa + the additive 4-D mask, and as Stage 1 with livr's compiled flex_attention BlockMask
   (median of interleaved rounds; ratios to SFT); tokens/s and the peak memory of a step; the vision tower with
   sdpa and with FlashAttention 2 (where flash-attn imports); an fp16 Stage-1 step (finite loss); the peak memory
   of one evaluation batch of 8 such rows (greedy generation, KV cache, LM head at the last position only).
Prints a table and a last line `key=value ...`. Without a CUDA device it prints one line and exits 0
(`--device cpu --backbone tiny-qwen2.5-vl` runs the same code on a CPU, for checking the script itself).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LIVR_QUIET", "1")

import torch


def run_tests(device: str, timeout: int) -> tuple[str, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/model/test_flex.py",
           "tests/model/test_vision_cache.py", "tests/model/test_gpu_readiness.py", "-k", "not zero3"]
    env = {**os.environ, "LIVR_QUIET": "1"}
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout} s"
    last = [ln for ln in r.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    return ("pass" if r.returncode == 0 else "FAIL"), (last[-1].strip("= ") if last else r.stdout[-300:])


def timed(fns: dict, repeat: int, device: torch.device) -> dict[str, float]:
    """Median ms per function over `repeat` interleaved rounds after one warm-up round (compiles happen there)."""
    import statistics

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(1000 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_mib(fn, device: torch.device) -> float:
    if device.type != "cuda":
        import resource

        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (process peak RSS on CPU)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def blink_row(images: int, size=(1024, 768)) -> dict:
    from PIL import Image

    from livr.data.synthetic import generate_task

    row = generate_task("Counting", 1, seed=0)[0]
    img = row["image_1"].convert("RGB").resize(size, Image.BICUBIC)
    for i in range(1, 5):
        row[f"image_{i}"] = img if i <= images else None
    return row


def build(args, device: torch.device, dtype: str, attn: str = "sdpa"):
    from livr.config import load_config
    from livr.model.build import build_model

    cfg = load_config(None, [f"model.backbone={args.backbone}", f"model.cache_dir={args.cache_dir}",
                             f"model.num_layers={args.depth}", f"model.device={device}", f"model.dtype={dtype}",
                             f"model.attn_implementation={attn}", "latents.num_latents=16", "lora.dropout=0.0"])
    lm = build_model(cfg)
    lm.model.train()
    return lm


def packing_step(lm, args, device, attn: str, rows: list, out: dict) -> None:
    """Stage-1 forward + backward of the paper's global batch (8 examples of 1-4 images) as 8 micro-batches of one
    vs packed into rows of at most `--max-tokens` (data.packing, livr/data/packing.py): ms per example."""
    from livr.data.packing import collate_packed
    from livr.data.sequence import collate

    items = [lm.builder.encode(blink_row(1 + i % 4)) for i in range(8)]
    pad = lm.tokenizer.pad_token_id
    micro = {"unpacked": [collate([it], pad) for it in items],
             "packed": collate_packed([dict(it) for it in items], pad, args.max_tokens)}

    def step(batches):
        def f():
            lm.set_attn_implementation(attn)
            for b in batches:
                nll, _ = lm.answer_nll(b, True)
                (nll / 100).backward()
            lm.model.zero_grad(set_to_none=True)
        return f

    ms = timed({k: step(v) for k, v in micro.items()}, args.repeat, device)
    tokens = sum(it["input_ids"].shape[0] for it in items)
    for k, v in ms.items():
        rows.append((f"Stage-1 step of 8 examples, {k} ({len(micro[k])} forwards, {tokens} tokens)",
                     f"{v / 8:.0f} ms/example", f"{ms['unpacked'] / v:.2f}x unpacked, {tokens / v * 1e3:,.0f} tokens/s"))
        out[f"{k}_ms_per_example"] = f"{v / 8:.1f}"
    out["packed_forwards"] = str(len(micro["packed"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="size-qwen2.5-vl-3b")
    ap.add_argument("--depth", type=int, default=4, help="decoder layers and vision blocks kept (0 = all)")
    ap.add_argument("--images", type=int, default=4, help="1024x768 images per row (4: L ~ 4,200)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16384, help="data.max_tokens of the packed step")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--test-timeout", type=int, default=240)
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "livr_gpu_check"))
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing measured (run it where a GPU is)")
        return 0
    from livr.data.sequence import collate
    from livr.model.attention import flash_available
    from livr.training.evaluate import generate

    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows: list[tuple[str, str, str]] = []
    out: dict[str, str] = {"device": gpu.replace(" ", "_")}
    if not args.skip_tests:
        t = time.time()
        status, line = run_tests(args.device, args.test_timeout)
        rows.append(("GPU-path tests", status, f"{line} ({time.time() - t:.0f} s)"))
        out["tests"] = status
    cuda = device.type == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    lm = build(args, device, dtype)
    row = blink_row(args.images)
    batch = collate([lm.builder.encode(row)], lm.tokenizer.pad_token_id)
    length = batch["input_ids"].shape[1]

    def step(bottleneck: bool, attn: str):
        def f():
            lm.set_attn_implementation(attn)
            nll, n = lm.answer_nll(batch, bottleneck)
            (nll / n).backward()
            lm.model.zero_grad(set_to_none=True)
        return f

    fns = {"sft": step(False, "sdpa"), "stage1_sdpa": step(True, "sdpa")}
    if cuda:  # (torch has no flex_attention backward on a CPU)
        fns["stage1_flex"] = step(True, "flex_attention")
    ms = timed(fns, args.repeat, device)
    for k, v in ms.items():
        ratio = v / ms["sft"]
        rows.append((f"train step {k} (L {length})", f"{v:.0f} ms", f"{ratio:.2f}x SFT, {length / v * 1e3:,.0f} tokens/s"))
        out[f"{k}_ms"], out[f"{k}_ratio"], out[f"{k}_tokens_per_s"] = f"{v:.1f}", f"{ratio:.3f}", f"{length / v * 1e3:.0f}"
    best = "stage1_flex" if "stage1_flex" in fns else "stage1_sdpa"
    mem = peak_mib(fns[best], device)
    rows.append((f"peak memory, {best} step", f"{mem:,.0f} MiB", f"depth {args.depth}, {dtype}"))
    out["train_peak_mib"] = f"{mem:.0f}"
    packing_step(lm, args, device, "flex_attention" if cuda else "sdpa", rows, out)

    base = lm.model.get_base_model()
    mm = {k: v.to(device) for k, v in batch.items() if k in ("pixel_values", "image_grid_thw")}
    mm["pixel_values"] = mm["pixel_values"].to(lm.dtype)
    kernels = ["sdpa"] + (["flash_attention_2"] if cuda and flash_available("flash_attention_2") else [])

    def tower(impl):
        def f():
            base.set_attn_implementation({"vision_config": impl})
            with torch.no_grad():
                base.model.get_image_features(**mm)
        return f

    vms = timed({k: tower(k) for k in kernels}, args.repeat, device)
    for k, v in vms.items():
        rows.append((f"vision tower, {k} ({args.images} images)", f"{v:.0f} ms", f"{vms['sdpa'] / v:.2f}x sdpa"))
        out[f"vision_{k}_ms"] = f"{v:.1f}"
    if len(kernels) == 1:
        rows.append(("vision tower, flash_attention_2", "n/a", "flash-attn not installed" if cuda else "CPU"))
    base.set_attn_implementation({"vision_config": lm.attention.vision})

    if cuda:
        del lm
        torch.cuda.empty_cache()
        half = build(args, device, "float16")
        nll, n = half.answer_nll(batch, True)
        (nll / n).backward()
        ok = bool(torch.isfinite(nll).item())
        rows.append(("fp16 Stage-1 step", "finite" if ok else "NON-FINITE", f"loss {nll.item() / n:.3f}"))
        out["fp16_finite"] = str(int(ok))
        del half
        torch.cuda.empty_cache()
        lm = build(args, device, dtype)
    lm.model.eval()
    items = [lm.builder.encode(r, with_answer=False) for r in [row] * 8]
    emem = peak_mib(lambda: generate(lm, items, max_new_tokens=4), device)
    rows.append((f"peak memory, eval batch 8 (L {items[0]['input_ids'].shape[0]})", f"{emem:,.0f} MiB", "generate, KV cache"))
    out["eval_peak_mib"] = f"{emem:.0f}"

    print(f"livr gpu_check on {gpu}: {args.backbone} at depth {args.depth}, {dtype}, torch {torch.__version__}")
    print("| check | result | detail |")
    print("|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(" ".join(f"{k}={v}" for k, v in out.items()))
    return 0 if out.get("tests", "pass") == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
