"""The frozen-vision cache (`model.cache_vision=true`): each image's visual features are computed once and fed to
the language model at every later step, epoch and evaluation.

The vision tower and projector are frozen and have no dropout (checked), so an image's features are a pure function
of the vision weights and settings, the dtype and device kind, and the image's processed input tensors (pixels, grid
or tiles). An entry's key hashes all of them: a changed image, a processor setting (it changes the pixels or the
grid) or another backbone never meets a stale entry. The per-image input digests are computed where rows are
encoded (the DataLoader workers: `SequenceBuilder.image_key_fn`), the backbone's part once here.

Entries live in host memory up to `model.vision_cache_mib`, then as one safetensors file per image under
`model.vision_cache_dir` (written atomically; "" = none: beyond the memory budget features are recomputed). A batch
with any image missing runs the family's stock encoder call on the whole batch (the same call the model makes
without the cache) and stores every image; the model then gets `mm_encoder_outputs` (transformers' precomputed
features input) instead of `pixel_values`. Not under ZeRO-3: there the vision forward is a collective that every
rank must join, and a rank whose batch is all hits would skip it.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import os
import re

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from livr.config import ConfigError

DIGEST = 16  # bytes per image digest (sha256, truncated)
_IDS = ("token_id", "token_ids", "token_index")  # special-token ids: the latents change them, not the features
_UNKEYED = ("text_config", "vocab_size", "_name_or_path", "architectures", "transformers_version", "dtype")


def digest(pieces: list[torch.Tensor]) -> bytes:
    """sha256 of the tensors (dtype, shape and bytes of each), truncated to DIGEST bytes."""
    h = hashlib.sha256()
    for t in pieces:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.digest()[:DIGEST]


def vision_model(model) -> torch.nn.Module:
    """The innermost module with `get_image_features` (the one the model's forward calls; sees through PEFT)."""
    found = [m for m in model.modules() if hasattr(type(m), "get_image_features")]
    if not found:
        raise ConfigError(f"config: model.cache_vision: {type(model).__name__} has no get_image_features")
    return found[-1]


def fingerprint(model, family, dtype: torch.dtype, device: torch.device) -> bytes:
    """What the features depend on besides the image: the frozen vision/projector tensors, the vision settings of
    the config, dtype, device kind and library versions."""
    inner = vision_model(model)
    h = hashlib.sha256(f"{family.name}|{dtype}|{device.type}|{torch.__version__}|{transformers.__version__}".encode())
    cfg = {k: v for k, v in inner.config.to_dict().items() if k not in _UNKEYED and not k.endswith(_IDS)}
    vision = getattr(inner.config, "vision_config", None)
    cfg["vision_attn"] = getattr(vision, "_attn_implementation", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    frozen = re.compile(family.frozen_module_regex)
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if frozen.fullmatch(name):
            h.update(name.encode())
            h.update(digest([t]))
    return h.digest()


def check_zero_stage(cfg, stage: int) -> None:
    """A one-line ConfigError for model.cache_vision under ZeRO-3 (before Ray starts workers, and in build_model)."""
    if cfg.model.cache_vision and stage == 3:
        raise ConfigError("config: model.cache_vision=true under ZeRO-3: the partitioned vision forward is a "
                          "collective every rank must join; use ZeRO-2 or set model.cache_vision=false")


def check_deterministic(model, family) -> None:
    """A one-line ConfigError when the frozen vision modules have dropout (their features would not be a function
    of the image in training mode)."""
    frozen = re.compile(family.frozen_module_regex)
    for name, m in model.named_modules():
        if not frozen.fullmatch(name):
            continue
        p = m.p if isinstance(m, torch.nn.Dropout) else getattr(getattr(m, "config", None), "attention_dropout", 0)
        if isinstance(p, (int, float)) and p > 0:
            raise ConfigError(f"config: model.cache_vision: {name} has dropout {p}: its features are not a function of "
                              "the image; set model.cache_vision=false")


class VisionCache:
    def __init__(self, model, family, dtype: torch.dtype, device: torch.device, max_mib: int, directory: str = ""):
        self.inner, self.family, self.dtype, self.device = vision_model(model), family, dtype, device
        if "mm_encoder_outputs" not in inspect.signature(self.inner.forward).parameters:
            raise ConfigError(f"config: model.cache_vision: {type(self.inner).__name__}.forward takes no "
                              "mm_encoder_outputs (precomputed image features); set model.cache_vision=false")
        check_deterministic(model, family)
        self.salt = fingerprint(model, family, dtype, device)
        self.max_bytes, self.dir = max_mib << 20, os.path.expanduser(directory) if directory else None
        self.mem: dict[str, tuple[torch.Tensor, ...]] = {}
        self.mem_bytes = 0
        self.hits = self.misses = self.disk_hits = self.dropped = 0

    def keys(self, mm: dict) -> torch.Tensor:
        """[images, DIGEST] uint8: the digest of each image's input tensors (model-independent part of its key)."""
        rows = [list(digest(p)) for p in self.family.image_pieces(self.inner.config, mm)]
        return torch.tensor(rows, dtype=torch.uint8).reshape(-1, DIGEST)

    def inputs(self, mm: dict, keys: torch.Tensor) -> dict:
        """`mm` (the forward's image inputs, on the device) with `pixel_values` replaced by `mm_encoder_outputs`:
        every image from the cache, or, if any is missing, the whole batch encoded and stored."""
        names = [hashlib.sha256(self.salt + bytes(k.tolist())).hexdigest()[:32] for k in keys.cpu()]
        feats = [self._get(n) for n in names]
        if any(f is None for f in feats):
            self.misses += sum(f is None for f in feats)
            with torch.no_grad():
                feats = self.family.encode_images(self.inner, mm)
            if len(feats) != len(names):
                raise RuntimeError(f"vision cache: {len(feats)} images encoded, {len(names)} keyed")
            for n, f in zip(names, feats):
                self._put(n, f)
        else:
            self.hits += len(feats)
            feats = [tuple(t.to(self.device, non_blocking=True) for t in f) for f in feats]
        out = {k: v for k, v in mm.items() if k != "pixel_values"}
        out["mm_encoder_outputs"] = {"image": self.family.image_outputs(feats)}
        return out

    def stats(self) -> dict:
        seen = self.hits + self.misses
        return {"vision_cache/hit_rate": self.hits / seen if seen else 0.0, "vision_cache/images": len(self.mem),
                "vision_cache/mib": self.mem_bytes / 2**20, "vision_cache/disk_hits": self.disk_hits, "vision_cache/dropped": self.dropped}

    # ------------------------------------------------------------------ storage
    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name[:2], name + ".safetensors")

    def _get(self, name: str):
        if name in self.mem:
            return self.mem[name]
        if self.dir and os.path.exists(self._path(name)):
            try:
                data = load_file(self._path(name))
            except (SafetensorError, OSError):  # unreadable (damaged by hand, a full disk): encoded again, rewritten
                with contextlib.suppress(OSError):
                    os.remove(self._path(name))
                return None
            self.disk_hits += 1
            return tuple(data[f"f{i}"] for i in range(len(data)))
        return None

    def _put(self, name: str, feats: tuple[torch.Tensor, ...]) -> None:
        feats = tuple(t.detach().to("cpu", copy=True).contiguous() for t in feats)
        size = sum(t.numel() * t.element_size() for t in feats)
        if self.mem_bytes + size <= self.max_bytes:
            self.mem[name], self.mem_bytes = feats, self.mem_bytes + size
        elif not self.dir:
            if not self.dropped:
                print(f"[livr] vision cache: model.vision_cache_mib={self.max_bytes >> 20} is full; further images are "
                      "encoded every time (model.vision_cache_dir keeps them on disk)", flush=True)
            self.dropped += 1
        elif not os.path.exists(self._path(name)):
            path = self._path(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            save_file({f"f{i}": t for i, t in enumerate(feats)}, tmp)
            os.replace(tmp, path)


def build_vision_cache(cfg, lm) -> VisionCache | None:
    """The run's cache (None unless `model.cache_vision`); the builder then digests each row's images as it encodes."""
    if not cfg.model.cache_vision:
        return None
    cache = VisionCache(lm.model, lm.family, lm.dtype, lm.device, cfg.model.vision_cache_mib, cfg.model.vision_cache_dir)
    lm.builder.image_key_fn = cache.keys
    return cache
