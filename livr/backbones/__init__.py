"""VLM backbones: per-family facts (Family), loading (load_backbone) and tiny offline presets (make_tiny)."""
from .base import Backbone, Family
from .registry import FAMILIES, TINY_PRESETS, family_for, load_backbone, make_tiny, resolve_backbone_path

__all__ = [
           "FAMILIES",
           "TINY_PRESETS",
           "Backbone",
           "Family",
           "family_for",
           "load_backbone",
           "make_tiny",
           "resolve_backbone_path",
]
