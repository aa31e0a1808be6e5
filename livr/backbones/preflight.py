"""Refusals from the backbone's config alone, before any weight loads: one-line ConfigErrors naming the field.

- `model.backbone`: a model type livr refuses (e.g. text-only `qwen3_next`, with the reason) or does not know;
  a hybrid family's checkpoint whose layer types livr has no Stage-1 bottleneck for (a Stage-1 run or
  `eval.bottleneck`).
- `lora.expert_targets` on a model without routed experts.
- `model.attn_implementation=flex_attention` for the bottleneck of a family whose own rules are not one causal mask
  (Qwen3.5's dict of masks per layer type, with the token groups for its Gated DeltaNet layers; Gemma 3's
  bidirectional images): livr's flex BlockMask is one causal mask for every layer, so such a family runs Stage 1
  under sdpa or eager (`auto` picks sdpa).
Called by build_model (every command that loads a model), by `livr train` before its data loads, and by `livr plan`.
"""
from __future__ import annotations


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
    from livr.plan_data import backbone_config

    try:
        config = backbone_config(cfg.model.backbone, cfg.model.cache_dir, 0, cfg.model.trust_remote_code)[0]
    except (OSError, ValueError):
        return
    check_backbone(cfg, config, family_of(cfg, config))


def family_of(cfg, config):
    """The family livr trains `config` with (declared, else the registry's; see plan_family), refusals as
    ConfigErrors naming model.backbone."""
    from livr.config import ConfigError
    from livr.plan_data import plan_family

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
    from livr.attention import flex_capable

    from .experts import num_experts

    if config is None:
        return
    text = config.get_text_config()
    if cfg.lora.expert_targets and not num_experts(text):
        _fail("lora.expert_targets", cfg.lora.expert_targets, f"{cfg.model.backbone} ({config.model_type}) has no "
              "routed experts (no MoE layer); leave it empty")
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
