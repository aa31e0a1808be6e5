"""Refusals from the backbone's config alone, before any weight loads: one-line ConfigErrors naming the field.

- `model.backbone`: a model type livr refuses (e.g. text-only `qwen3_next`, with the reason) or does not know;
  a hybrid family's checkpoint whose layer types livr has no Stage-1 bottleneck for (a Stage-1 run or
  `eval.bottleneck`).
- `lora.expert_targets` on a model without routed experts.
- `model.attn_implementation=flex_attention` for the bottleneck of a family whose own rules are not one causal mask
  (Qwen3.5's dict of masks per layer type, with the token groups for its Gated DeltaNet layers; Gemma 3's
  bidirectional images): livr's flex BlockMask is one causal mask for every layer, so such a family runs Stage 1
  under sdpa or eager (`auto` picks sdpa); with `data.packing`, flex for any stage of such a family (the packed
  BlockMask has the same limit).
Called by build_model (every command that loads a model), by `livr train` before its data loads, and by `livr plan`.
"""
from __future__ import annotations

import os


def _fail(key: str, value, why: str):
    from livr.config import ConfigError

    raise ConfigError(f"config: {key}={value!r}: {why}")


def config_at(path: str, trust_remote_code: bool = False):
    """config.json of a model directory (None where transformers cannot read it: declared families check later)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None


def registered_family(cfg, path: str):
    """The registry's family of the model at `path`; a refused or unknown model type is a ConfigError naming
    model.backbone (a plain ValueError would reach the user as a traceback)."""
    from .registry import family_for

    try:
        return family_for(path, cfg.model.trust_remote_code)
    except ValueError as e:
        _fail("model.backbone", cfg.model.backbone, str(e))


def check_before_loading(cfg) -> None:
    """check_backbone from the configured backbone's config where it is on this machine without building or
    downloading anything (a preset's parts in memory, a directory, a cached hub id); else build_model checks."""
    try:
        config = backbone_config(cfg.model.backbone, cfg.model.cache_dir, 0, cfg.model.trust_remote_code)[0]
    except (OSError, ValueError):
        return
    check_backbone(cfg, config, family_of(cfg, config))


def family_of(cfg, config):
    """The family livr trains `config` with (declared, else the registry's; see plan_family), refusals as
    ConfigErrors naming model.backbone."""
    from livr.config import ConfigError

    try:
        return plan_family(cfg, config)
    except ConfigError:
        raise
    except ValueError as e:
        _fail("model.backbone", cfg.model.backbone, str(e))


def bottleneck_runs(cfg) -> bool:
    """Whether this config runs the Stage-1 bottleneck (training Stage 1, or evaluating under it)."""
    t = cfg.train
    return (t.mode == "livr" and (t.stage1_epochs > 0 or t.stage1_steps > 0)) or cfg.eval.bottleneck


def check_backbone(cfg, config, family) -> None:
    """Every refusal above for `cfg` and the backbone's `config` (None: nothing to check yet)."""
    from .base import flex_capable
    from .experts import num_experts

    if config is None:
        return
    text = config.get_text_config()
    if cfg.lora.expert_targets and not num_experts(text):
        _fail("lora.expert_targets", cfg.lora.expert_targets, f"{cfg.model.backbone} ({config.model_type}) has no "
              "routed experts (no MoE layer); leave it empty")
    m = cfg.model
    if cfg.data.packing and "flex_attention" in {m.attn_implementation, m.attn_implementation_stage2} \
            and not flex_capable(family):
        _fail("data.packing", True, f"with flex_attention: family {family.name} has its own attention rules, which "
              "livr's packed flex BlockMask (one causal mask with document ids) cannot carry; use sdpa or eager "
              "(or auto) with packing")
    if not bottleneck_runs(cfg):
        return
    kinds = getattr(family, "layer_kinds", None)
    unknown = sorted(set(getattr(text, "layer_types", None) or ()) - set(kinds)) if kinds else []
    if unknown:
        _fail("model.backbone", cfg.model.backbone, f"layer types {unknown} have no Stage-1 bottleneck in livr "
              f"(family {family.name} knows {list(kinds)}); train.mode=sft runs it without one")
    if cfg.model.attn_implementation == "flex_attention" and not flex_capable(family):
        _fail("model.attn_implementation", "flex_attention", f"family {family.name} has its own attention rules (not "
              "one causal mask for every layer), which livr's flex BlockMask cannot carry; use sdpa or eager (or auto) "
              "for its Stage 1")


def backbone_config(name_or_path: str, cache_dir: str, num_layers: int = 0, trust_remote_code: bool = False):
    """(transformers config, where it came from) for a preset (built in memory, never materialised), a local
    dir, a shipped copy, or a hub id; cut to `num_layers` decoder layers when > 0."""
    from transformers import AutoConfig

    from .base import SHIPPED, shipped_config
    from .registry import SIZE_HUB_IDS, is_preset, preset_parts, truncate_config

    if is_preset(name_or_path):
        config = preset_parts(name_or_path, num_layers)[0]
        hub = SIZE_HUB_IDS.get(name_or_path)
        return config, f"preset {name_or_path}" + (f" = {hub}'s architecture" if hub else "")
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        source = os.path.join(os.path.abspath(path), "config.json")
    elif (config := shipped_config(name_or_path)) is not None:
        source = os.path.join(SHIPPED, name_or_path.replace("/", "__") + ".json")
    else:
        try:
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            source = f"{name_or_path} (HF cache / hub)"
        except OSError as e:
            raise FileNotFoundError(
                f"cannot read the config of {name_or_path!r} ({str(e).splitlines()[0]}): livr plan needs it from "
                f"the HF cache or the hub (unset HF_HUB_OFFLINE once), or model.backbone=<a local dir with config.json>"
            ) from None
    return truncate_config(config, num_layers, name_or_path), source


def plan_family(cfg, config):
    """The family livr trains `config` with: the config-declared one (`model.family`) if any, else the registry's."""
    if getattr(cfg.model, "family", None):
        from .declared import declared_family

        return declared_family(cfg.model.family)
    from .registry import family_for

    return family_for(config.model_type)
