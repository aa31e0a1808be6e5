"""The backbone-family interface (Family), a loaded backbone (Backbone), and helpers families share.

A family is one module in livr/backbones/families/ holding a `Family` subclass decorated with
`livr.backbones.registry.register`: everything livr needs from that VLM architecture is an attribute or a method
of it (loading classes, image placeholder, where the latents go, end of turn, LoRA / frozen patterns, position ids
for a 4-D-mask forward and for decoding, the processor's settings, the presets). Nothing outside the family's
module names a family. docs/backbones.md shows how to add one.

Position ids (what `Family.position_ids` returns and how decoding continues from it):
- rope "mrope" (Qwen2.5-VL / Qwen3-VL): a LongTensor [3, B, L] (temporal, height, width axes), from the inner
  model's `get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=..., attention_mask=<2-D mask>)`. Text tokens
  have the same value on all 3 axes; an image's tokens get a (t, h, w) grid starting at the current text position,
  and the text after it continues at (start + max(h, w) / merge). Pad positions get 0.
- rope "1d" (LLaVA-OneVision's Qwen2 LM): a LongTensor [B, L] = cumsum(mask) - 1, clamped at 0 (pads 0).
- `next_position_ids(pos, n)`: the positions of the next n tokens appended after the prefix:
  max(pos over the sequence [and the 3 axes]) + 1 .. + n per example, same value on every rope axis
  ([3, B, n] for mRoPE, [B, n] for 1-D). Works for left-, right- and un-padded prefixes (pads are 0).
A KV-cache decode step is `model(input_ids=new[B, n], attention_mask=<2-D [B, L+n] or 4-D [B,1,n,L+n]>,
position_ids=next_position_ids(pos, n), cache=out.cache, use_cache=True)`; the kwarg is `cache`
(`past_key_values` is deprecated to `cache` in transformers 5.24), the prefix forward returns it as `out.cache`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

SHIPPED = os.path.join(os.path.dirname(__file__), "configs")  # configs of the real checkpoints (offline)


def _inner_with(model, attr):
    """First submodule (the model itself included) that has `attr`: sees through PeftModel / DeepSpeed wrappers."""
    for m in model.modules():
        if hasattr(type(m), attr):
            return m
    raise ValueError(f"no submodule of {type(model).__name__} has {attr!r}")


class Family:
    """What livr needs from one VLM family. Subclass it in one module of livr/backbones/families/ and decorate the
    subclass with `@register`. Regexes are for re.fullmatch on module / parameter names (peft full-matches a string
    target_modules): lora_target_regex hits only the LM's projections; frozen_module_regex hits the vision tower and
    projector modules and all their parameters."""

    # --- identity and loading
    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # HF config.model_type values this family loads
    model_class: ClassVar[type]  # the *ForConditionalGeneration class (from_pretrained / _from_config)
    processor_class: ClassVar[type]  # the real transformers processor class (wrapped by make_processor)
    image_processor_class: ClassVar[type]  # the *ImageProcessorPil class (no torchvision needed)
    # --- the sequence
    image_token: ClassVar[str]  # the placeholder the processor expands into the image's tokens
    assistant_header: ClassVar[str]  # the generation prompt: the K latents + delimiter go right after it
    end_of_turn: ClassVar[str]  # appended to the answer (labelled)
    forward_keys: ClassVar[tuple[str, ...]]  # processor outputs the model's forward takes
    rope: ClassVar[str] = "1d"  # "1d" or "mrope" (see the module docstring)
    # --- training
    lora_target_regex: ClassVar[str]
    frozen_module_regex: ClassVar[str]
    # --- presets: a tiny random one (tests, demo) and the real architecture with random weights
    tiny_preset: ClassVar[str | None] = None
    size_preset: ClassVar[str | None] = None
    hub_id: ClassVar[str | None] = None  # the real checkpoint the size preset copies
    image_processor_defaults: ClassVar[dict] = {}  # that checkpoint's preprocessor settings

    @property
    def mrope(self) -> bool:
        return self.rope == "mrope"

    def __repr__(self) -> str:
        return f"<livr family {self.name}>"

    def lora_targets(self, targets: list[str]) -> list[str]:
        """The module names LoRA targets for the configured `lora.targets` (a hybrid family adds its linear-attention
        projections where attention projections are asked for)."""
        return list(targets)

    # --- positions
    def position_ids(self, model, input_ids, attention_mask_2d, mm: dict) -> torch.Tensor:
        """Explicit positions for a forward that gets a 4-D mask (see module docstring for shapes)."""
        mask = attention_mask_2d.to(input_ids.device).long()
        if not self.mrope:
            return (mask.cumsum(-1) - 1).clamp_min(0)
        inner = _inner_with(model, "get_rope_index")
        types = mm.get("mm_token_type_ids")
        if types is None or types.shape != input_ids.shape:  # e.g. after latents were inserted: derive from ids
            cfg = inner.config
            types = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()
        pos, _ = inner.get_rope_index(input_ids, types.to(input_ids.device), image_grid_thw=mm.get("image_grid_thw"),
                                      video_grid_thw=mm.get("video_grid_thw"), attention_mask=mask)
        return pos

    def next_position_ids(self, position_ids, num_new: int = 1) -> torch.Tensor:
        """Positions of `num_new` tokens appended after a prefix whose positions are `position_ids`."""
        step = torch.arange(1, num_new + 1, device=position_ids.device)
        if self.mrope:  # [3, B, L] -> [3, B, n]
            last = position_ids.amax(dim=(0, 2))
            return (last[:, None] + step).unsqueeze(0).expand(position_ids.shape[0], -1, -1).contiguous()
        return position_ids.amax(dim=-1, keepdim=True) + step  # [B, L] -> [B, n]

    # --- the model's own mask, and the Stage-1 mask composed with it
    def own_allowed(self, model, groups: torch.Tensor, rows: int | None = None):
        """The model's own attention rules as boolean [B, Q, L] from the token groups: causal without PAD columns
        for a causal LM; a dict {layer type: [B, Q, L]} for a model whose layers differ (see gemma3.py). Q = L, or
        the last `rows` query rows (a decode step)."""
        from livr.method.mask import causal_allowed

        return causal_allowed(groups, rows)

    def stage1_mask(self, model, groups: torch.Tensor, dtype: torch.dtype, rows: int | None = None):
        """The `attention_mask` of a Stage-1 forward: allowed = the model's own mask AND NOT the bottleneck's
        blocks (prompt/answer rows x image columns), additive [B,1,L,L] (a dict of them per layer type when
        `own_allowed` is one). `rows`: only the last `rows` query rows (a KV-cache decode step)."""
        from livr.method.mask import bottleneck_blocked

        own, open_ = self.own_allowed(model, groups, rows), ~bottleneck_blocked(groups, rows=rows)
        allowed = {kind: a & open_ for kind, a in own.items()} if isinstance(own, dict) else own & open_
        return self.as_mask(model, allowed, dtype, rows)

    def as_mask(self, model, allowed, dtype: torch.dtype, rows: int | None = None):
        """Boolean [B, Q, L] (or a dict per layer type) -> the model's `attention_mask` argument: additive
        [B,1,Q,L]; `rows`: the last `rows` query rows of a KV-cache decode step (against the cache's keys; `allowed`
        may hold just those rows or all L)."""
        from livr.method.mask import additive

        if isinstance(allowed, dict):
            return {kind: additive(a, dtype, rows) for kind, a in allowed.items()}
        return additive(allowed, dtype, rows)

    def packed_mask(self, model, groups: torch.Tensor, segments: torch.Tensor, bottleneck: bool, dtype: torch.dtype):
        """The `attention_mask` of a packed row (livr/data/packing.py; `segments` [B, L] numbers its examples):
        `packed_allowed` (block-diagonal: the model's own rule, and under Stage 1 the bottleneck, inside each example)
        as `as_mask` makes it."""
        from livr.method.mask import packed_allowed

        return self.as_mask(model, packed_allowed(self, model, groups, segments, bottleneck), dtype)

    # --- processor and images
    def processor_kwargs(self, config) -> dict:
        """Processor settings taken from the model config (so that its image-token count equals the model's)."""
        return {}

    def image_grids(self, vision_config, positions: torch.Tensor, item: dict) -> list[tuple[torch.Tensor, int, int]]:
        """Per image of one encoded example: (sequence positions of its grid tokens, rows, cols), row-major.
        `positions`: the example's image-token positions in order. Default: Qwen's merged-patch grid from
        image_grid_thw (frames of a video: the first)."""
        merge, start, out = vision_config.spatial_merge_size, 0, []
        for t, h, w in item["image_grid_thw"].tolist():
            gh, gw = h // merge, w // merge
            out.append((positions[start : start + gh * gw], gh, gw))
            start += t * gh * gw
        return out

    def image_cost(self, io: dict, width: int, height: int, images_in_row: int) -> tuple[int, int]:
        """(image tokens, bytes of its fp32 pixel_values) of one width×height image, from the processor classes
        (`livr plan`). Default: a Qwen-style patch/merge processor."""
        ip = io["image_processor"]
        patches = ip.get_number_of_image_patches(height, width, {})
        return patches // ip.merge_size**2, patches * 3 * ip.temporal_patch_size * ip.patch_size**2 * 4

    # --- the frozen vision encoder, one image at a time (livr/model/vision_cache.py)
    stacked_image_features: ClassVar[bool] = False  # the encoder's pooler_output is one [images, tokens, dim] tensor

    def image_pieces(self, config, mm: dict) -> list[list[torch.Tensor]]:
        """Per image of a batch (or of one example): the input tensors that alone decide its visual features (the
        vision cache hashes them). Default: Qwen's patch rows + (t, h, w) grid from image_grid_thw, else one
        pixel_values row per image."""
        px = mm["pixel_values"]
        if "image_grid_thw" not in mm:
            return [[x] for x in px]
        grid = mm["image_grid_thw"]
        return [[rows, g] for rows, g in zip(px.split(grid.prod(-1).tolist()), grid)]

    def encode_images(self, inner, mm: dict) -> list[tuple[torch.Tensor, ...]]:
        """Per image of the batch: its features from the inner model's stock `get_image_features` (the pooled
        image tokens, then one tensor per DeepStack tap where the model has them)."""
        out = inner.get_image_features(**self.encoder_kwargs(inner, mm), return_dict=True)
        deep = getattr(out, "deepstack_features", None) or []
        return [(pooled, *(d[i] for d in deep)) for i, pooled in enumerate(out.pooler_output)]

    def encoder_kwargs(self, inner, mm: dict) -> dict:
        """What the model's forward hands its `get_image_features` (config defaults fill in the rest)."""
        return {k: mm[k] for k in ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images") if k in mm}

    def image_outputs(self, feats: list[tuple[torch.Tensor, ...]]):
        """Per-image features back as the model's `mm_encoder_outputs["image"]` (see `encode_images`)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooled = [f[0] for f in feats]
        out = BaseModelOutputWithPooling(pooler_output=torch.stack(pooled) if self.stacked_image_features else tuple(pooled))
        if len(feats[0]) > 1:
            out.deepstack_features = [tuple(f[j] for f in feats) for j in range(1, len(feats[0]))]
        return out

    # --- depth (model.num_layers) and presets
    def depth(self, config) -> int:
        return config.get_text_config().num_hidden_layers

    def truncate_depth(self, config, n: int):
        """`config` cut to its first n decoder layers (and vision blocks), in place; returns it."""
        truncate_text(config.get_text_config(), n)
        return config

    def init_random(self, model) -> None:
        """Fix up a random-init preset model where transformers' init leaves a weight degenerate (default: none)."""

    def tiny_parts(self):
        """(config, tokenizer, image_processor) of the tiny preset."""
        raise NotImplementedError(f"family {self.name} has no tiny preset")

    def size_parts(self):
        """(config, tokenizer, image_processor) of the real-size preset (hub_id's architecture)."""
        raise NotImplementedError(f"family {self.name} has no size preset")


# ----------------------------------------------------------------------------- helpers families share
def contiguous_runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) index pairs of the runs of consecutive values in `positions` (one run per image)."""
    breaks = [0] + [i + 1 for i in range(len(positions) - 1) if positions[i + 1] != positions[i] + 1]
    return list(zip(breaks, [*breaks[1:], len(positions)]))


def truncate_text(text, n: int) -> None:
    text.num_hidden_layers = n
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types[:n])
    if getattr(text, "max_window_layers", None) is not None:
        text.max_window_layers = min(text.max_window_layers, n)


def shipped_config(hub_id: str):
    """The transformers config of a hub checkpoint from the copy in livr/backbones/configs (None if not shipped)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = os.path.join(SHIPPED, hub_id.replace("/", "__") + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)


def set_token_ids(cfg, tok, top_level: dict) -> None:
    """Point a real-size config at the offline tokenizer's special tokens (the vocab size stays the checkpoint's:
    rows beyond len(tokenizer) are unused padding, as in the real checkpoints)."""
    for k, v in top_level.items():
        setattr(cfg, k, v)
    text = cfg.get_text_config()
    text.bos_token_id, text.eos_token_id, text.pad_token_id = None, tok.eos_token_id, tok.pad_token_id


def set_generation_ids(model, tok) -> None:
    """The tokenizer's pad / end ids in the model's generation config (no BOS: ChatML)."""
    g = model.generation_config
    g.pad_token_id = tok.pad_token_id
    g.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    g.bos_token_id = None


def random_model(family: Family, cfg, tok, seed: int = 0, attn_implementation: str = "sdpa", dtype=None):
    """A random-init model of `cfg` (seeded) of the family's class, with the tokenizer's generation ids (the
    tiny and real-size presets). dtype None = torch's default."""
    torch.manual_seed(seed)
    kw = {"dtype": dtype} if dtype is not None else {}
    model = family.model_class._from_config(cfg, attn_implementation=attn_implementation, **kw)
    family.init_random(model)
    set_generation_ids(model, tok)
    return model


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    processor: Any
    family: Family
    path: str


_WRAPPED: dict[type, type] = {}


def processor_class_for(cls: type) -> type:
    """Subclass of a transformers processor class that accepts video_processor=None (no torchvision here: the
    stock check raises `VIDEO_PROCESSOR_MAPPING has no attribute '_extra_content'`), pads by default, and whose
    save_pretrained writes the tokenizer (+ chat template) and the image processor."""
    if cls not in _WRAPPED:
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return cls.check_argument_for_proper_class(self, argument_name, argument)

        def __call__(self, *args, **kwargs):
            kwargs.setdefault("padding", True)
            return cls.__call__(self, *args, **kwargs)

        def save_pretrained(self, save_directory, **kwargs):  # the stock one fails on video_processor=None
            return [*self.tokenizer.save_pretrained(save_directory, **kwargs),
                    *self.image_processor.save_pretrained(save_directory, **kwargs)]

        _WRAPPED[cls] = type("Livr" + cls.__name__, (cls,), {
            "check_argument_for_proper_class": check_argument_for_proper_class, "__call__": __call__,
            "save_pretrained": save_pretrained})
    return _WRAPPED[cls]


def make_processor(family: Family, image_processor, tokenizer, config, chat_template=None):
    """The family's processor around an image processor and tokenizer, with settings taken from the model config
    so that the processor's image-token count always equals the model's feature count."""
    cls = processor_class_for(family.processor_class)
    import inspect

    video = {"video_processor": None} if "video_processor" in inspect.signature(family.processor_class).parameters else {}
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template or tokenizer.chat_template,
               **video, **family.processor_kwargs(config))



def flex_capable(family) -> bool:
    """Whether the family's own attention rule is one causal mask for every layer (what a flex BlockMask carries)."""
    return type(family).own_allowed is Family.own_allowed


# ----------------------------------------------------------------------------- the registry's table
FAMILIES: dict[str, Family] = {}
# model types livr knows and refuses, with why (a faithful bottleneck for them does not exist yet)
REFUSED: dict[str, str] = {
    "qwen3_next": "Qwen3-Next is a text-only model (no vision tower, no image tokens): there is no image for the "
                  "visual bottleneck to hold back (its hybrid Gated DeltaNet layers are supported in Qwen3.5)"}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add a Family subclass (one instance of it) to the registry."""
    fam = cls()
    for attr in ("name", "model_types", "model_class", "processor_class", "image_processor_class", "image_token",
                 "assistant_header", "end_of_turn", "forward_keys", "lora_target_regex", "frozen_module_regex"):
        if not hasattr(fam, attr):
            raise TypeError(f"backbone family {cls.__name__} does not define {attr!r}")
    if fam.rope not in ("1d", "mrope"):
        raise TypeError(f"backbone family {fam.name}: rope={fam.rope!r} (choose '1d' or 'mrope')")
    taken = {t: f.name for f in FAMILIES.values() if f.name != fam.name for t in f.model_types}
    if clash := [t for t in fam.model_types if t in taken]:
        raise TypeError(f"backbone family {fam.name}: model_type {clash[0]!r} is already family {taken[clash[0]]}")
    FAMILIES[fam.name] = fam
    return cls
