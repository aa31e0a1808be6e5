"""Real-scale host memory and start-up: `train_worker` on BLINK-like rows of 4 JPEG images of 1024x768.

    python bench/scale.py [--backbone size-qwen2.5-vl-3b] [--num-layers 2] [--ns 100 1000] [--steps 3]

A real-size preset (the published architecture, random weights, the checkpoint's own image processor) at
depth --num-layers trains through the real loop: rows in BLINK's schema on disk (save_to_disk, JPEG bytes),
loaded by the local BLINK loader, encoded by DataLoader workers. Each configuration runs in its own
subprocess so that peaks do not mix. Measured per configuration: peak RSS of the rank (and of its largest
loader worker), the time from the start of `train_worker` to its first batch and to its first optimizer step,
step times and the time the loop waited for data. Then the loss step alone: LM head + NLL over a sequence of the same length
with full logits vs only the labelled positions (peak RSS growth). Prints a table and a last line
`rss_mib_n100=… rss_mib_n1000=… rss_growth_mib_per_1000_rows=… first_step_s_n100=… first_step_s_n1000=…
data_wait_share_w0=… data_wait_share_w2=… loss_peak_ratio=…`.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LIVR_QUIET": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TASK = "Jigsaw"


def _maxrss_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def make_rows(root: str, n: int, size=(1024, 768), distinct: int = 32) -> None:
    """n BLINK-schema rows with 4 JPEG images each (smooth pictures, ~60-120 KB each) + 2 val rows."""
    import datasets
    import numpy as np
    from PIL import Image, ImageDraw

    from livr.data.synthetic import features

    rng = np.random.default_rng(0)
    pool = []
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    for k in range(distinct):
        c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
        t = (xx * np.cos(k) + yy * np.sin(k)) / (w + h)
        arr = (c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]).astype(np.uint8)
        im = Image.fromarray(arr)
        draw = ImageDraw.Draw(im)
        for _ in range(12):
            x, y = rng.integers(0, w - 120), rng.integers(0, h - 120)
            draw.ellipse([x, y, x + rng.integers(30, 120), y + rng.integers(30, 120)], fill=tuple(rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())

    def row(i, split):
        img = {f"image_{j + 1}": {"bytes": pool[(4 * i + j) % distinct], "path": None} for j in range(4)}
        return {"idx": f"{split}_{TASK}_{i}", "question": "Which candidate completes the first image?", "sub_task": TASK,
                **img, "choices": ["the second image", "the third image"], "answer": "(A)" if i % 2 == 0 else "(B)",
                "prompt": "", "explanation": ""}

    for split, count in (("train", n), ("val", 2)):
        ds = datasets.Dataset.from_list([row(i, split) for i in range(count)], features=features())
        ds.save_to_disk(os.path.join(root, TASK, split))


def child(spec: dict) -> None:
    """One configuration in this (fresh) process: train_worker for `steps` optimizer steps, instrumented."""
    os.environ.update(ENV)
    os.environ["LIVR_FAIL_AT_STEP"] = str(spec["steps"])  # stop right after the last measured step
    import torch

    import livr.training.train as T
    from livr.config import load_config

    t0 = time.perf_counter()
    steps, waits, first_batch = [], [], []

    class Timed:
        def __init__(self, loader):
            self.it = iter(loader)

        def __iter__(self):
            return self

        def __next__(self):
            s = time.perf_counter()
            out = next(self.it)
            waits.append(time.perf_counter() - s)
            if not first_batch:
                first_batch.append(time.perf_counter())
            return out

    real_make = T.make_loader
    T.make_loader = lambda *a, **k: Timed(real_make(*a, **k))

    class Recording(torch.optim.AdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.register_step_pre_hook(lambda *_: steps.append(time.perf_counter()))

    torch.optim.AdamW = Recording
    cfg = load_config(None, spec["overrides"])
    try:
        T.train_worker(cfg)
    except RuntimeError as e:
        if "injected failure" not in str(e):
            raise
    per_step = [b - a for a, b in itertools.pairwise(steps)]
    # data wait after the first step (worker start-up excluded) as a share of the steady-state step time
    steady_wait = sum(waits[spec["accum"]:])
    steady = steps[-1] - steps[0] if len(steps) > 1 else float("nan")
    print("RESULT " + json.dumps({
        "rss_mib": _maxrss_mib(), "worker_rss_mib": _maxrss_mib(resource.RUSAGE_CHILDREN),
        "first_batch_s": first_batch[0] - t0 if first_batch else float("nan"),
        "first_step_s": steps[0] - t0, "step_s": sum(per_step) / max(1, len(per_step)),
        "data_wait_share": steady_wait / steady if len(steps) > 1 and steady > 0 else float("nan")}), flush=True)


def loss_child(spec: dict) -> None:
    """Peak RSS growth of the loss step (LM head + NLL, forward and backward) at length L."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    L, H, V, labelled = spec["L"], spec["H"], spec["V"], 3
    head = torch.randn(V, H) * 0.02
    hidden = torch.randn(1, L, H, requires_grad=True)
    labels = torch.randint(0, V, (labelled,))
    base = _maxrss_mib()
    if spec["full"]:
        logits = hidden @ head.T  # [1, L, V]
        loss = F.cross_entropy(logits[0, -labelled - 1 : -1].float(), labels)
    else:
        logits = hidden[:, -labelled - 1 : -1] @ head.T  # only the positions that predict labelled tokens
        loss = F.cross_entropy(logits[0].float(), labels)
    loss.backward()
    print("RESULT " + json.dumps({"peak_mib": _maxrss_mib() - base}), flush=True)


def run_child(kind: str, spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, f"--{kind}", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, **ENV}, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="size-qwen2.5-vl-3b")
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--ns", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--child", default="")
    ap.add_argument("--loss-child", default="")
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))
    if a.loss_child:
        return loss_child(json.loads(a.loss_child))
    work = a.workdir or tempfile.mkdtemp(prefix="livr-scale-")
    data = os.path.join(work, "data")
    if not os.path.isdir(os.path.join(data, TASK, "train")):
        t = time.perf_counter()
        make_rows(data, max(a.ns))
        print(f"[scale] wrote {max(a.ns)} rows of 4 JPEG 1024x768 images in {time.perf_counter() - t:.0f} s", flush=True)

    def spec(n, workers):
        return {"steps": a.steps, "accum": 1, "overrides": [
            f"name=scale-n{n}-w{workers}", f"output_dir={work}/runs", f"model.backbone={a.backbone}",
            f"model.num_layers={a.num_layers}", f"model.cache_dir={work}/backbones", f"data.source={data}",
            f"data.tasks=[{TASK}]", f"data.train_size={n}", "data.val_size=2", f"data.num_workers={workers}",
            "eval.splits=[]", "train.micro_batch_size=1", "train.grad_accum=1", f"train.stage1_steps={a.steps + 1}",
            "train.stage2_steps=1", "train.resume=false", "tracking.enabled=false", "latents.num_latents=16",
            "model.dtype=float32"]}

    from livr.backbones import resolve_backbone_path

    t = time.perf_counter()
    preset = resolve_backbone_path(a.backbone, os.path.join(work, "backbones"), a.num_layers)  # once, not timed below
    print(f"[scale] backbone {a.backbone} (depth {a.num_layers or 'full'}) at {preset}: {time.perf_counter() - t:.0f} s",
          flush=True)
    runs = {}
    for n in a.ns:
        runs[(n, 2)] = run_child("child", spec(n, 2))
        print(f"[scale] n={n} workers=2: {runs[(n, 2)]}", flush=True)
    runs[(a.ns[0], 0)] = run_child("child", spec(a.ns[0], 0))
    print(f"[scale] n={a.ns[0]} workers=0: {runs[(a.ns[0], 0)]}", flush=True)

    with open(os.path.join(preset, "config.json")) as f:
        conf = json.load(f)
    text = conf.get("text_config", conf)
    L = 4203  # a 4-image 1024x768 Qwen2.5-VL example (STACK.md)
    loss = {full: run_child("loss-child", {"L": L, "H": text["hidden_size"], "V": text["vocab_size"], "full": full})
            for full in (True, False)}
    n0, n1 = a.ns[0], a.ns[-1]
    print("\n| rows | loader workers | peak RSS rank (MiB) | largest worker (MiB) | first batch (s) | first step (s) "
          "| step (s) | data wait share |")
    print("|---|---|---|---|---|---|---|---|")
    for (n, w), r in sorted(runs.items()):
        print(f"| {n} | {w} | {r['rss_mib']:.0f} | {r['worker_rss_mib']:.0f} | {r['first_batch_s']:.1f} | {r['first_step_s']:.1f} | "
              f"{r['step_s']:.1f} | {r['data_wait_share']:.2e} |")
    print(f"\nloss step at L={L}, vocab {text['vocab_size']}, hidden {text['hidden_size']} (fp32): full logits "
          f"{loss[True]['peak_mib']:.0f} MiB, labelled positions only {loss[False]['peak_mib']:.0f} MiB")
    growth = (runs[(n1, 2)]["rss_mib"] - runs[(n0, 2)]["rss_mib"]) / max(1, n1 - n0) * 1000
    print(f"rss_mib_n{n0}={runs[(n0, 2)]['rss_mib']:.0f} rss_mib_n{n1}={runs[(n1, 2)]['rss_mib']:.0f} "
          f"rss_growth_mib_per_1000_rows={growth:.0f} first_step_s_n{n0}={runs[(n0, 2)]['first_step_s']:.1f} "
          f"first_step_s_n{n1}={runs[(n1, 2)]['first_step_s']:.1f} first_batch_s_n{n0}={runs[(n0, 2)]['first_batch_s']:.1f} "
          f"first_batch_s_n{n1}={runs[(n1, 2)]['first_batch_s']:.1f} "
          f"data_wait_share_w0={runs[(n0, 0)]['data_wait_share']:.2e} data_wait_share_w2={runs[(n0, 2)]['data_wait_share']:.2e} "
          f"loss_peak_ratio={loss[False]['peak_mib'] / max(1e-9, loss[True]['peak_mib']):.4f}")


if __name__ == "__main__":
    main()
