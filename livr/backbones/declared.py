"""A backbone family declared in the config (`model.family: {...}`), for a VLM livr has no module for — remote code
included (`model.trust_remote_code=true`).

    model:
      backbone: /models/my-vlm            # its config.json may carry an auto_map (remote code)
      trust_remote_code: true
      family:
        base: qwen3_vl                     # a registered family to start from (optional)
        model_types: [my_vlm]              # config.json's model_type
        auto_class: AutoModelForImageTextToText
        image_token: "<|image_pad|>"
        lora_target_regex: '(.*\\.)?language_model\\.layers\\.\\d+\\.(self_attn\\.(q|k|v|o)_proj|mlp\\.(gate|up|down)_proj)'
        frozen_module_regex: '(.*\\.)?visual(\\..*)?'

Every key is optional given a `base`; without one, all but `base` are required. Classes are transformers names
(`Qwen3VLProcessor`) or dotted import paths. `livr verify` gates such a family: a wrong image token or pattern makes
the bottleneck leak, and verify fails before any training.
"""
from __future__ import annotations

import importlib
import re

from livr.config import register_check

from .base import Family
from .registry import FAMILIES

CLASS_KEYS = ("auto_class", "processor_class", "image_processor_class")
KEYS = ("base", "name", "model_types", *CLASS_KEYS, "image_token", "assistant_header", "end_of_turn", "forward_keys",
        "rope", "lora_target_regex", "frozen_module_regex")
REQUIRED = tuple(k for k in KEYS if k != "base")


def _fail(key: str, value, why: str):
    from livr.config import ConfigError

    raise ConfigError(f"config: model.family.{key}={value!r}: {why}")


def _resolve_class(key: str, name: str) -> type:
    if not isinstance(name, str) or not name:
        _fail(key, name, "must name a class (a transformers name or a dotted import path)")
    module, _, attr = name.rpartition(".") if "." in name else ("transformers", "", name)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        _fail(key, name, f"no such class in {module}")


def declared_family(spec: dict) -> Family:
    """A Family from `model.family`; a one-line ConfigError naming the key for anything unusable."""
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        _fail(unknown[0], spec[unknown[0]], f"unknown key (valid: {', '.join(KEYS)})")
    base = spec.get("base")
    if base is not None and base not in FAMILIES:
        _fail("base", base, f"not a registered family (choose from {', '.join(sorted(FAMILIES))})")
    parent = type(FAMILIES[base]) if base else Family
    missing = [k for k in REQUIRED if k not in spec and (not base or k in ("model_types",))]
    if missing:
        _fail(missing[0], None, "required" + ("" if base else " when no `base` family is given"))
    attrs = {k: v for k, v in spec.items() if k != "base"}
    attrs.setdefault("name", f"declared:{attrs['model_types'][0]}" if attrs.get("model_types") else "declared")
    for k in ("model_types", "forward_keys"):
        if k in attrs:
            if not isinstance(attrs[k], (list, tuple)) or not attrs[k] or not all(isinstance(t, str) for t in attrs[k]):
                _fail(k, attrs[k], "must be a non-empty list of strings")
            attrs[k] = tuple(attrs[k])
    for k in ("image_token", "assistant_header", "end_of_turn"):
        if k in attrs and (not isinstance(attrs[k], str) or not attrs[k]):
            _fail(k, attrs[k], "must be a non-empty string")
    if attrs.get("rope", "1d" if not base else FAMILIES[base].rope) not in ("1d", "mrope"):
        _fail("rope", attrs["rope"], "must be 1d or mrope")
    for k in ("lora_target_regex", "frozen_module_regex"):
        if k in attrs:
            try:
                re.compile(attrs[k])
            except (re.error, TypeError) as e:
                _fail(k, attrs[k], f"not a valid regular expression ({e})")
    if "auto_class" in attrs:
        attrs["model_class"] = _resolve_class("auto_class", attrs.pop("auto_class"))
    for k in ("processor_class", "image_processor_class"):
        if k in attrs:
            attrs[k] = _resolve_class(k, attrs[k])
    cls = type(f"Declared_{re.sub(r'[^0-9A-Za-z_]', '_', attrs['name'])}", (parent,), attrs)
    return cls()


def check_family(cfg) -> None:
    """`model.family` (a declared family) is usable: checked with the config, before anything loads."""
    if cfg.model.family:
        declared_family(cfg.model.family)


register_check("model.family", check_family)
