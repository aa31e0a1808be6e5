"""VLM backbones: per-family facts (Family), loading (load_backbone) and offline presets (make_preset); one plug-in
module per family in `families/`, the registry, config-declared families (`declared`).

Layer: above `livr.method`; may import it, `livr.config` and `livr.utils`. Beside `livr.data`, which it never
imports. Never imports Ray, DeepSpeed or MLflow."""
from . import declared as _declared  # noqa: F401 (registers the model.family config check)
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
