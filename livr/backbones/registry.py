"""Finding, materialising and loading backbones.

A tiny preset is materialised once (random init, `save_pretrained`) and then loaded through exactly the same
`from_pretrained` path as a real checkpoint. Real ids work by config alone (family from config.model_type):
Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-4B-Instruct, llava-hf/llava-onevision-qwen2-*-ov-hf.

Tiny presets (measured on 2 CPU cores, torch 2.13, fp32 sdpa; fwd+bwd of one example with one 112x112 image):
  tiny-qwen2.5-vl       289,888 params   112px -> 16 image tokens, ~42 tokens/example   fwd+bwd ~20 ms
  tiny-qwen3-vl         258,272 params   112px -> 16 image tokens (resized to 128px)    fwd+bwd ~20 ms
  tiny-llava-onevision  248,864 params   112px -> 36 image tokens (17 each with 2/ex.)  fwd+bwd ~20 ms
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


def make_tiny(name: str, out_dir: str, *, seed: int = 0, progress: bool = False) -> str:
    """Materialise tiny preset `name` into out_dir (model, generation config, tokenizer + chat template, image
    processor), atomically: built in a temp dir next to out_dir, then renamed. Returns out_dir."""
    if name not in _TINY_FAMILY:
        raise ValueError(f"unknown tiny preset {name!r}; choose from {TINY_PRESETS}")
    from tqdm.auto import tqdm

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    bar = tqdm(total=4, desc=f"materialise {name}", disable=not progress)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        bar.set_postfix_str("tokenizer + model")
        model, tok, ip = build_tiny(name, seed=seed)
        bar.update()
        model.save_pretrained(tmp)
        bar.update()
        tok.save_pretrained(tmp)
        bar.update()
        ip.save_pretrained(tmp)
        with open(os.path.join(tmp, "livr_preset.json"), "w") as f:
            json.dump({"preset": name, "seed": seed}, f)
        bar.update()
        if os.path.isdir(out_dir):  # a concurrent builder won; keep theirs
            shutil.rmtree(tmp)
        else:
            try:
                os.rename(tmp, out_dir)
            except OSError:  # lost a race between the check and the rename
                shutil.rmtree(tmp, ignore_errors=True)
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
        if not os.path.isfile(os.path.join(out, "config.json")):
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
