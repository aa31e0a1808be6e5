"""The family registry, and finding, materialising and loading backbones.

Families register themselves: each module of livr/backbones/families/ (and each module named by an entry point
of the `livr.backbones` group, for families that live in other packages) defines one `Family` subclass decorated
with `@register`. Presets, `family_for` and `load_backbone` read only the registry.

A preset is materialised once (random init, `save_pretrained`) and then loaded through exactly the same
`from_pretrained` path as a real checkpoint. Real ids work by config alone (family from config.model_type):
Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-4B-Instruct, llava-hf/llava-onevision-qwen2-*-ov-hf.

Tiny presets (random init, initializer_range 0.1; LM hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16,
intermediate 128; vision depth 2, hidden 32; BPE vocab 1024 + specials). Measured on 2 CPU cores, torch 2.13,
fp32 sdpa, fwd+bwd of one example (chat template + one 112x112 image):
  tiny-qwen2.5-vl       289,888 params  untied  112px -> 16 tokens, 56px -> 4, capped at 224x224 (64)  ~10 ms
  tiny-qwen3-vl         258,272 params  tied    112px -> 16 (resized to 128), 56px -> 4, cap 256x256    ~10 ms
  tiny-qwen3-vl-moe     324,768 params  untied  as tiny-qwen3-vl; 4 experts of width 32, 2 per token
  tiny-llava-onevision  248,864 params  untied  alone in its example: 112px or 56px -> 36 tokens;
                                                two images per example: 17 tokens each                   ~10 ms

Size presets: the published architecture of a real checkpoint (every width, head count, the vocab size, rope /
mRoPE sections, tied or untied head, the checkpoint's image processor settings) with random weights (init 0.02,
saved in bfloat16 like the checkpoints), the offline BPE tokenizer with the family's special tokens and chat
template (the embedding keeps the real vocab size: rows beyond len(tokenizer) are unused padding, which
livr/method/latents.py reuses for the latent tokens). `num_layers=N` (model.num_layers) keeps the first N decoder
layers and the first min(N, depth) vision blocks, so a CPU can run a step at true width and sequence length:
  size-qwen2.5-vl-3b       Qwen/Qwen2.5-VL-3B-Instruct              3,754,622,976 params (36 layers, vision 32)
  size-qwen3-vl-4b         Qwen/Qwen3-VL-4B-Instruct                4,437,815,808 params (36 layers, vision 24)
  size-llava-onevision-7b  llava-hf/llava-onevision-qwen2-7b-ov-hf  8,030,807,584 params (28 layers, vision 26)
  size-gemma-3-4b          google/gemma-3-4b-it                     4,300,079,472 params (34 layers, vision 27)
  size-qwen3-vl-30b-a3b    Qwen/Qwen3-VL-30B-A3B-Instruct          31,070,754,032 params (48 layers, vision 27; MoE)
  size-qwen3.5-4b          Qwen/Qwen3.5-4B                          4,539,265,536 params (32 layers, 24 of them
                                                                    Gated DeltaNet; vision 24)
  size-qwen3.5-35b-a3b     Qwen/Qwen3.5-35B-A3B                    35,107,181,936 params (40 layers, 30 of them
                                                                    Gated DeltaNet; vision 27; MoE)
A materialised preset lives in <cache_dir>/<name>-L<depth> (tiny presets at their own depth: <cache_dir>/<name>);
its livr_preset.json records name, seed, depth and dtype.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import pkgutil
import shutil
import tempfile

import torch
from transformers import AutoConfig, AutoTokenizer
from transformers.utils import cached_file

from .base import FAMILIES, REFUSED, Backbone, Family, make_processor, random_model, register  # noqa: F401


def _discover() -> None:
    from importlib.metadata import entry_points

    from . import families

    for mod in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{mod.name}")
    for ep in entry_points(group="livr.backbones"):
        ep.load()


_discover()
_TINY_FAMILY = {f.tiny_preset: f.name for f in FAMILIES.values() if f.tiny_preset}
_SIZE_FAMILY = {f.size_preset: f.name for f in FAMILIES.values() if f.size_preset}
TINY_PRESETS = tuple(_TINY_FAMILY)
SIZE_PRESETS = tuple(_SIZE_FAMILY)
PRESETS = TINY_PRESETS + SIZE_PRESETS
_PRESET_FAMILY = {**_TINY_FAMILY, **_SIZE_FAMILY}
SIZE_HUB_IDS = {name: FAMILIES[fam].hub_id for name, fam in _SIZE_FAMILY.items()}
SIZE_DTYPE = "bfloat16"  # how size presets are saved (the checkpoints' dtype); loading casts to model.dtype


def is_preset(name: str) -> bool:
    return name in _PRESET_FAMILY


def _check_preset(name: str) -> None:
    if name not in _PRESET_FAMILY:
        raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}")


def _model_type(model_type_or_path: str, trust_remote_code: bool = False) -> str:
    path = os.path.expanduser(model_type_or_path)
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ValueError(f"{path} has no config.json: not a model directory")
        with open(cfg_file) as f:
            return json.load(f).get("model_type", "")
    if model_type_or_path in _PRESET_FAMILY:
        return FAMILIES[_PRESET_FAMILY[model_type_or_path]].model_types[0]
    if "/" in model_type_or_path:  # a hub id: its config (from the local HF cache when offline)
        return AutoConfig.from_pretrained(model_type_or_path, trust_remote_code=trust_remote_code).model_type
    return model_type_or_path


def family_for(model_type_or_path: str, trust_remote_code: bool = False) -> Family:
    """Family by HF config.model_type, given directly, or read from a local dir's config.json (or a preset name)."""
    mt = _model_type(model_type_or_path, trust_remote_code)
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    if mt in REFUSED:
        raise ValueError(f"model_type {mt!r} (from {model_type_or_path!r}) is not supported: {REFUSED[mt]}")
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported model_type {mt!r} (from {model_type_or_path!r}); supported: {supported} "
                     "(add a family: docs/backbones.md)")


def _bad_depth(num_layers: int, what: str, have: int):
    from livr.config import ConfigError  # a ValueError naming the config key

    raise ConfigError(f"config: model.num_layers={num_layers}: {what} has {have} decoder layers (0 = all of them)")


def truncate_config(config, num_layers: int, what: str = "the backbone"):
    """`config` cut to its first `num_layers` decoder layers (and vision blocks; see the family's truncate_depth),
    in place. 0 = unchanged. More layers than the checkpoint has is an error."""
    if not num_layers:
        return config
    fam = family_for(config.model_type)
    have = fam.depth(config)
    if num_layers < 0 or num_layers > have:
        _bad_depth(num_layers, what, have)
    return fam.truncate_depth(config, num_layers)


def preset_parts(name: str, num_layers: int = 0):
    """(config, tokenizer, image_processor) of preset `name` at depth `num_layers` (0 = its own): no weights."""
    _check_preset(name)
    fam = FAMILIES[_PRESET_FAMILY[name]]
    cfg, tok, ip = fam.tiny_parts() if name in _TINY_FAMILY else fam.size_parts()
    return truncate_config(cfg, num_layers, name), tok, ip


@functools.cache
def _own_depth(name: str) -> int:
    return preset_parts(name)[0].get_text_config().num_hidden_layers


def preset_depth(name: str, num_layers: int = 0) -> int:
    """The decoder depth preset `name` is materialised at (num_layers, or the preset's own depth for 0)."""
    _check_preset(name)
    own = _own_depth(name)
    if num_layers < 0 or num_layers > own:
        _bad_depth(num_layers, name, own)
    return num_layers or own


def build_preset(name: str, seed: int = 0, attn_implementation: str = "sdpa", num_layers: int = 0):
    """In-memory (model, tokenizer, image_processor) of preset `name` (what make_preset saves). Size presets are
    built straight in bfloat16 (RAM = the bf16 model); tiny presets in float32."""
    cfg, tok, ip = preset_parts(name, num_layers)
    dtype = getattr(torch, SIZE_DTYPE) if name in _SIZE_FAMILY else None
    return random_model(FAMILIES[_PRESET_FAMILY[name]], cfg, tok, seed, attn_implementation, dtype=dtype), tok, ip


def build_tiny(name: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """In-memory (model, tokenizer, image_processor) of tiny preset `name` (what make_tiny saves)."""
    if name not in _TINY_FAMILY:
        raise ValueError(f"unknown tiny preset {name!r}; choose from {TINY_PRESETS}")
    return build_preset(name, seed=seed, attn_implementation=attn_implementation)


def _native(name: str, num_layers: int) -> bool:
    """A tiny preset at its own depth keeps its original directory name and stamp."""
    return name in _TINY_FAMILY and num_layers in (0, preset_depth(name))


def preset_dirname(name: str, num_layers: int = 0) -> str:
    """Directory name of a materialised preset: <name>-L<depth> (a tiny preset at its own depth: <name>)."""
    _check_preset(name)
    return name if _native(name, num_layers) else f"{name}-L{preset_depth(name, num_layers)}"


def _preset_stamp(name, seed, num_layers: int = 0):
    if _native(name, num_layers):
        return {"preset": name, "seed": seed, "format": 1}
    return {"preset": name, "seed": seed, "num_layers": preset_depth(name, num_layers),
            "dtype": SIZE_DTYPE if name in _SIZE_FAMILY else "float32", "format": 1}


def _is_preset(d, name, seed, num_layers: int = 0) -> bool:
    try:
        with open(os.path.join(d, "livr_preset.json")) as f:
            return json.load(f) == _preset_stamp(name, seed, num_layers)
    except (OSError, ValueError):
        return False


def make_preset(name: str, out_dir: str, *, seed: int = 0, num_layers: int = 0, progress: bool = False) -> str:
    """Materialise preset `name` (tiny or size) at depth `num_layers` (0 = its own) into out_dir (model,
    generation config, tokenizer + chat template, image processor, livr_preset.json), atomically: built in a temp
    dir next to out_dir, then renamed into place. An existing out_dir is replaced, unless it already holds this
    preset, seed and depth (e.g. a concurrent builder finished first). Returns out_dir.
    Peak RAM: the model in its saved dtype plus one 1 GB shard being written."""
    _check_preset(name)
    from tqdm.auto import tqdm

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    steps = ["build model + tokenizer", "save model", "save tokenizer", "save image processor", "install"]
    bar = tqdm(total=len(steps), desc=f"materialise {name}", disable=None if progress else True)  # None: tty only
    try:
        bar.set_postfix_str(steps[0])
        model, tok, ip = build_preset(name, seed=seed, num_layers=num_layers)
        bar.update()
        bar.set_postfix_str(steps[1])
        model.save_pretrained(tmp, max_shard_size="1GB")
        del model
        for step, save in zip(steps[2:4], (tok, ip)):
            bar.update()
            bar.set_postfix_str(step)
            save.save_pretrained(tmp)
        with open(os.path.join(tmp, "livr_preset.json"), "w") as f:
            json.dump(_preset_stamp(name, seed, num_layers), f)
        bar.update()
        bar.set_postfix_str(steps[4])
        if _is_preset(out_dir, name, seed, num_layers):
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


def make_tiny(name: str, out_dir: str, *, seed: int = 0, progress: bool = False, num_layers: int = 0) -> str:
    """Materialise a preset into out_dir (kept name: any preset works; see make_preset)."""
    return make_preset(name, out_dir, seed=seed, num_layers=num_layers, progress=progress)


def resolve_backbone_path(name_or_path: str, cache_dir: str, num_layers: int = 0, download: bool = False) -> str:
    """Preset name -> cache_dir/<preset_dirname> (materialised on first use, at depth num_layers); existing local
    dir -> itself; anything else (a hub id) is returned unchanged for from_pretrained to resolve, after
    `download=True` fetched its files into the HF cache (unless HF_HUB_OFFLINE)."""
    if name_or_path in _PRESET_FAMILY:
        out = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), preset_dirname(name_or_path, num_layers))
        if not _is_preset(out, name_or_path, 0, num_layers):
            make_preset(name_or_path, out, num_layers=num_layers)
        return out
    local = os.path.expanduser(name_or_path)
    if os.path.isdir(local):
        return os.path.abspath(local)
    if download and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        from huggingface_hub import snapshot_download

        snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model",
                                                        "*.tiktoken", "*.py"])
    return name_or_path


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
                  device="cpu", attn_implementation="sdpa", trust_remote_code=False, num_layers: int = 0,
                  family: Family | None = None) -> Backbone:
    """Model, tokenizer and processor of a preset, local dir or hub id, through the stock from_pretrained.
    num_layers > 0 (model.num_layers): a preset is materialised at that depth; a checkpoint loads only its first
    num_layers decoder layers (and vision blocks) into a config cut to that depth. `family`: a config-declared
    family (livr/backbones/declared.py) instead of the registry's."""
    path = resolve_backbone_path(name_or_path, cache_dir, num_layers)
    if family is None:
        family = family_for(path, trust_remote_code)
    elif (mt := _model_type(path, trust_remote_code)) not in family.model_types:
        from livr.config import ConfigError

        raise ConfigError(f"config: model.family.model_types={list(family.model_types)}: {name_or_path} has "
                          f"model_type {mt!r}")
    kw = {}
    if num_layers and name_or_path not in _PRESET_FAMILY:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if num_layers < 0 or num_layers > family.depth(config):
            _bad_depth(num_layers, name_or_path, family.depth(config))
        kw["config"] = family.truncate_depth(config, num_layers)
    model = family.model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                               trust_remote_code=trust_remote_code, **kw)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    template = _chat_template(path, tok)
    if template and not tok.chat_template:
        tok.chat_template = template
    ip = family.image_processor_class.from_pretrained(path)
    processor = make_processor(family, ip, tok, model.config, chat_template=template)
    return Backbone(model=model, tokenizer=tok, processor=processor, family=family, path=path)
