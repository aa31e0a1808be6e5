"""Family (the facts livr needs about one VLM architecture), Backbone (a loaded model + tokenizer + processor)
and the processor wrapper.

Position ids (what `Family.position_ids` returns and how decoding continues from it):
- Qwen2.5-VL / Qwen3-VL (mRoPE): a LongTensor [3, B, L] (temporal, height, width axes), from the inner model's
  `get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=..., attention_mask=<2-D mask>)`. Text tokens have
  the same value on all 3 axes; an image's tokens get a (t, h, w) grid starting at the current text position, and
  the text after it continues at (start + max(h, w) / merge). Pad positions get 0.
- LLaVA-OneVision (plain 1-D RoPE in a Qwen2 LM): a LongTensor [B, L] = cumsum(mask) - 1, clamped at 0 (pads 0).
- `next_position_ids(pos, n)`: the positions of the next n tokens appended after the prefix:
  max(pos over the sequence [and the 3 axes]) + 1 .. + n per example, same value on every rope axis
  ([3, B, n] for Qwen, [B, n] for LLaVA). Works for left-, right- and un-padded prefixes (pads are 0).
A KV-cache decode step is `model(input_ids=new[B, n], attention_mask=<2-D [B, L+n] or 4-D [B,1,n,L+n]>,
position_ids=next_position_ids(pos, n), cache=out.cache, use_cache=True)`; the kwarg is `cache`
(`past_key_values` is deprecated to `cache` in transformers 5.24), the prefix forward returns it as `out.cache`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast


def _inner_with(model, attr):
    """First submodule (the model itself included) that has `attr`: sees through PeftModel / DeepSpeed wrappers."""
    for m in model.modules():
        if hasattr(type(m), attr):
            return m
    raise ValueError(f"no submodule of {type(model).__name__} has {attr!r}")


@dataclass(frozen=True)
class Family:
    """Facts about one VLM family. Regexes are for re.fullmatch on module / parameter names (peft uses fullmatch
    for a string target_modules): lora_target_regex hits only the LM's q/k/v/o/gate/up/down projections;
    frozen_module_regex hits the vision tower and projector modules and all their parameters."""

    name: str
    model_types: tuple[str, ...]
    model_class: type
    image_token: str
    assistant_header: str
    end_of_turn: str
    lora_target_regex: str
    frozen_module_regex: str
    forward_keys: tuple[str, ...]
    processor_class: type = None  # the real transformers processor class (wrapped by make_processor)
    image_processor_class: type = None  # the *ImageProcessorPil class (no torchvision needed)
    mrope: bool = False  # Qwen-style 3-axis rope positions from get_rope_index

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
    kw = {}
    if family.name == "llava_onevision":
        v = config.vision_config
        kw = {"num_image_tokens": (v.image_size // v.patch_size) ** 2, "image_token": family.image_token,
              "vision_feature_select_strategy": config.vision_feature_select_strategy,
              "vision_aspect_ratio": config.vision_aspect_ratio}
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
               chat_template=chat_template or tokenizer.chat_template, **kw)
