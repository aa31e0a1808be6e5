"""VLM backbones: per-family facts (Family), loading (load_backbone) and offline presets (make_preset)."""
from .base import Backbone, Family
from .registry import (
    FAMILIES,
    PRESETS,
    SIZE_PRESETS,
    TINY_PRESETS,
    family_for,
    load_backbone,
    make_preset,
    make_tiny,
    preset_parts,
    resolve_backbone_path,
)

__all__ = [
           "FAMILIES",
           "PRESETS",
           "SIZE_PRESETS",
           "TINY_PRESETS",
           "Backbone",
           "Family",
           "family_for",
           "load_backbone",
           "make_preset",
           "make_tiny",
           "preset_parts",
           "resolve_backbone_path",
]
