"""Finding, materialising and loading backbones.

A tiny preset is materialised once (random init, `save_pretrained`) and then loaded through exactly the same
`from_pretrained` path as a real checkpoint. Real ids work by config alone (family from config.model_type):
Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-4B-Instruct, llava-hf/llava-onevision-qwen2-*-ov-hf.

Tiny presets (random init, initializer_range 0.1; LM hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16,
intermediate 128; vision depth 2, hidden 32; BPE vocab 1024 + specials). Measured on 2 CPU cores, torch 2.13,
fp32 sdpa, fwd+bwd of one example (chat template + one 112x112 image):
  tiny-qwen2.5-vl       289,888 params  untied  112px -> 16 tokens, 56px -> 4, capped at 224x224 (64)  ~10 ms
  tiny-qwen3-vl         258,272 params  tied    112px -> 16 (resized to 128), 56px -> 4, cap 256x256    ~10 ms
  tiny-llava-onevision  248,864 params  untied  alone in its example: 112px or 56px -> 36 tokens;
                                                two images per example: 17 tokens each                   ~10 ms
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import cached_file

from . import llava_onevision, qwen2_5_vl, qwen3_vl
from .base import Backbone, Family, make_processor

_MODULES = {"qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "llava_onevision": llava_onevision}
FAMILIES: dict[str, Family] = {name: mod.FAMILY for name, mod in _MODULES.items()}
TINY_PRESETS = ("tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-llava-onevision")
_TINY_FAMILY = dict(zip(TINY_PRESETS, ("qwen2_5_vl", "qwen3_vl", "llava_onevision")))


def _model_type(model_type_or_path: str) -> str:
    path = os.path.expanduser(model_type_or_path)
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ValueError(f"{path} has no config.json: not a model directory")
        with open(cfg_file) as f:
            return json.load(f).get("model_type", "")
    if model_type_or_path in _TINY_FAMILY:
        return FAMILIES[_TINY_FAMILY[model_type_or_path]].model_types[0]
    if "/" in model_type_or_path:  # a hub id: its config (from the local HF cache when offline)
        return AutoConfig.from_pretrained(model_type_or_path).model_type
    return model_type_or_path


def family_for(model_type_or_path: str) -> Family:
    """Family by HF config.model_type, given directly, or read from a local dir's config.json (or a preset name)."""
    mt = _model_type(model_type_or_path)
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported model_type {mt!r} (from {model_type_or_path!r}); supported: {supported}")


def build_tiny(name: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """In-memory (model, tokenizer, image_processor) of tiny preset `name` (what make_tiny saves)."""
    if name not in _TINY_FAMILY:
        raise ValueError(f"unknown tiny preset {name!r}; choose from {TINY_PRESETS}")
    return _MODULES[_TINY_FAMILY[name]].build_tiny(seed=seed, attn_implementation=attn_implementation)


def _preset_stamp(name, seed):
    return {"preset": name, "seed": seed, "format": 1}


def _is_preset(d, name, seed) -> bool:
    try:
        with open(os.path.join(d, "livr_preset.json")) as f:
            return json.load(f) == _preset_stamp(name, seed)
    except (OSError, ValueError):
        return False


def make_tiny(name: str, out_dir: str, *, seed: int = 0, progress: bool = False) -> str:
    """Materialise tiny preset `name` into out_dir (model, generation config, tokenizer + chat template, image
    processor, livr_preset.json), atomically: built in a temp dir next to out_dir, then renamed into place.
    An existing out_dir is replaced, unless it already holds this preset and seed (e.g. a concurrent builder
    finished first). Returns out_dir."""
    if name not in _TINY_FAMILY:
        raise ValueError(f"unknown tiny preset {name!r}; choose from {TINY_PRESETS}")
    from tqdm.auto import tqdm

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    steps = ["build model + tokenizer", "save model", "save tokenizer", "save image processor", "install"]
    bar = tqdm(total=len(steps), desc=f"materialise {name}", disable=not progress)
    try:
        bar.set_postfix_str(steps[0])
        model, tok, ip = build_tiny(name, seed=seed)
        for step, save in zip(steps[1:4], (model, tok, ip)):
            bar.update()
            bar.set_postfix_str(step)
            save.save_pretrained(tmp)
        with open(os.path.join(tmp, "livr_preset.json"), "w") as f:
            json.dump(_preset_stamp(name, seed), f)
        bar.update()
        bar.set_postfix_str(steps[4])
        if _is_preset(out_dir, name, seed):
            shutil.rmtree(tmp)
        else:
            old = tmp + ".old"
            if os.path.lexists(out_dir):
                os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except OSError:  # a concurrent builder renamed first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return out_dir


def resolve_backbone_path(name_or_path: str, cache_dir: str) -> str:
    """Tiny preset name -> cache_dir/<name> (materialised on first use); existing local dir -> itself;
    anything else (a hub id) is returned unchanged for from_pretrained to resolve."""
    if name_or_path in _TINY_FAMILY:
        out = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), name_or_path)
        if not _is_preset(out, name_or_path, 0):
            make_tiny(name_or_path, out)
        return out
    local = os.path.expanduser(name_or_path)
    return os.path.abspath(local) if os.path.isdir(local) else name_or_path


def _chat_template(path, tok):
    """Tokenizer's template, else the processor's chat_template.json / .jinja (how some hub repos ship it)."""
    if tok.chat_template:
        return tok.chat_template
    for fname in ("chat_template.jinja", "chat_template.json"):
        f = cached_file(path, fname, _raise_exceptions_for_missing_entries=False)
        if f:
            with open(f) as fh:
                text = fh.read()
            return json.loads(text)["chat_template"] if fname.endswith(".json") else text
    return None


def load_backbone(name_or_path: str, *, cache_dir: str = "~/.cache/livr/backbones", dtype=torch.float32,
                  device="cpu", attn_implementation="sdpa", trust_remote_code=False) -> Backbone:
    """Model, tokenizer and processor of a tiny preset, local dir or hub id, through the stock from_pretrained."""
    path = resolve_backbone_path(name_or_path, cache_dir)
    family = family_for(path)
    model = family.model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                               trust_remote_code=trust_remote_code)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    template = _chat_template(path, tok)
    if template and not tok.chat_template:
        tok.chat_template = template
    ip = family.image_processor_class.from_pretrained(path)
    processor = make_processor(family, ip, tok, model.config, chat_template=template)
    return Backbone(model=model, tokenizer=tok, processor=processor, family=family, path=path)
