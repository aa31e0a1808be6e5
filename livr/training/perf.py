"""Throughput telemetry of the training loop: `perf/*` metrics on every logged step, without host syncs between.

The loop times two things with `time.perf_counter` on the host: how long it waits on the loader's `next()`, and
how long `train_step` takes; the engine adds the time spent in clipping + the optimizer (`engine.opt_s`). Token
counts come from the host tensors of the collated batches. Only a log step synchronises (CUDA), so the window's
wall time between two log steps is exact even though each step's host time is only its launch time.

Metrics (one window = the steps since the last log step):
  perf/tokens_per_s      non-pad tokens / window wall time
  perf/samples_per_s     examples / window wall time
  perf/data_wait_share   time blocked on the loader / window wall time
  perf/fwd_bwd_share     forward + backward (the step minus the optimizer) / window wall time
  perf/optimizer_share   clipping + optimizer step / window wall time
  perf/peak_mem_mib      CUDA max allocated (GPU), or the process's peak RSS (CPU)
  perf/tflops            model TFLOP/s (livr/model/flops.py)
  perf/mfu               perf/tflops / the device's peak (omitted when the peak is unknown: CPU without
                         train.device_peak_tflops)
  perf/eval_s            (at an epoch's end) seconds the evaluation took
"""
from __future__ import annotations

import resource
import time

import torch

from livr.method.groups import IMAGE
from livr.model import flops


class PerfMeter:
    def __init__(self, lm, cfg):
        self.device = lm.device
        self.config = flops.model_config(lm.model)
        self.r, self.targets = cfg.lora.r, cfg.lora.targets
        self.vision = not cfg.model.cache_vision
        self.merge = (flops.vision_dims(self.config) or {}).get("merge", 1)
        self.peak = flops.device_peak_tflops(self.device, getattr(cfg.train, "device_peak_tflops", 0.0))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start()

    def start(self) -> None:
        """Open a window (after a log step, or after an evaluation that should not count)."""
        self.t0 = time.perf_counter()
        self.wait = self.opt = self.tokens = self.samples = self.flops = 0.0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def stepped(self, micro: list[dict], opt_s: float = 0.0) -> None:
        """Count one optimizer step's micro-batches (host tensors: no device sync)."""
        self.opt += opt_s
        for b in micro:
            lengths = b["seq_lens"] if "seq_lens" in b else b["attention_mask"].sum(1)
            lengths = lengths.to(torch.float64)
            self.tokens += float(lengths.sum())
            self.samples += float(lengths.numel())
            self.flops += flops.lm_flops(self.config, float(lengths.sum()), float((lengths ** 2).sum()), self.r,
                                         self.targets)
            if self.vision and "groups" in b:
                self.flops += self._vision(b)

    def _vision(self, b: dict) -> float:
        if "image_grid_thw" in b:  # Qwen: the exact patches of each image
            per_image = b["image_grid_thw"].to(torch.float64).prod(1)
        else:  # one image per example's image tokens (an overestimate of the attention term for several images)
            per_image = (b["groups"] == IMAGE).sum(1).to(torch.float64) * self.merge ** 2
        return flops.vision_flops(self.config, float(per_image.sum()), float((per_image ** 2).sum()))

    def metrics(self) -> dict[str, float]:
        """The window's metrics (synchronises a CUDA device first), then a new window."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        wall = max(time.perf_counter() - self.t0, 1e-9)
        compute = max(wall - self.wait - self.opt, 0.0)
        out = {"perf/tokens_per_s": self.tokens / wall, "perf/samples_per_s": self.samples / wall,
               "perf/data_wait_share": min(1.0, self.wait / wall), "perf/fwd_bwd_share": compute / wall,
               "perf/optimizer_share": min(1.0, self.opt / wall), "perf/peak_mem_mib": peak,
               "perf/tflops": self.flops / wall / 1e12}
        if self.peak:
            out["perf/mfu"] = out["perf/tflops"] / self.peak
        self.start()
        return out


def opt_seconds(engine) -> float:
    """The optimizer time the engine accumulated since the last call (0 for an engine that does not time it)."""
    s = getattr(engine, "opt_s", 0.0)
    if s:
        engine.opt_s = 0.0
    return s
