"""Gemma 3 (e.g. google/gemma-3-4b-it): the family and its tiny preset.

Gemma 3's own mask differs from a plain causal one in two ways, and the Stage-1 bottleneck composes with both
(allowed = the model's own mask AND the bottleneck, never a replacement):
- each image's soft tokens attend to each other both ways (bidirectional within an image);
- `sliding_attention` layers see only the last `sliding_window` positions (the window applies after the image
  rule, as in transformers' `create_masks_for_vision_model`).
So its Stage-1 mask is a dict {layer type: additive [B,1,L,L]}, one per layer type, as the model itself builds.
"""
from typing import ClassVar

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from ..base import Family, contiguous_runs, register, shipped_config, truncate_text
from ..tokenizer import GEMMA_TEMPLATE, build_tokenizer

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                  "<end_of_image>", "<image_soft_token>"]
TINY_IMAGE_SIZE = 56  # SigLIP input; patch 14 -> 4x4 patches, pooled to 2x2 = 4 soft tokens per image
TINY_SLIDING_WINDOW = 24  # short enough that the tiny sequences (60-120 tokens) exercise the window


def image_blocks(groups: torch.Tensor, image_group: int) -> torch.Tensor:
    """[B, L]: k for the tokens of the k-th image of each example (a contiguous run of image tokens), 0 elsewhere."""
    img = groups == image_group
    start = img & ~torch.nn.functional.pad(img, (1, 0))[:, :-1]
    return torch.cumsum(start, 1) * img


def _text_config(model):
    """The Gemma 3 text config, through PEFT / DeepSpeed wrappers."""
    return next(m.config for m in model.modules() if isinstance(getattr(m, "config", None), Gemma3Config)).get_text_config()


@register
class Gemma3(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    model_class = Gemma3ForConditionalGeneration
    processor_class = Gemma3Processor
    image_processor_class = Gemma3ImageProcessorPil
    image_token = "<image_soft_token>"
    assistant_header = "<start_of_turn>model\n"
    end_of_turn = "<end_of_turn>"
    forward_keys = ("pixel_values", "token_type_ids")
    rope = "1d"
    lora_target_regex = r"(.*\.)?language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    frozen_module_regex = r"(.*\.)?(vision_tower|multi_modal_projector)(\..*)?"
    tiny_preset, size_preset, hub_id = "tiny-gemma3", "size-gemma-3-4b", "google/gemma-3-4b-it"
    stacked_image_features = True  # get_image_features: [images, mm_tokens_per_image, dim]
    image_processor_defaults: ClassVar[dict] = {"size": {"height": 896, "width": 896}, "image_mean": [0.5] * 3,
                                                "image_std": [0.5] * 3}

    def processor_kwargs(self, config) -> dict:
        return {"image_seq_length": config.mm_tokens_per_image}

    def own_allowed(self, model, groups, rows=None):
        """Gemma 3's own rules: causal, OR both ways within each image; sliding layers AND the window after that.
        `rows`: only the last `rows` query rows (a decode step)."""
        from livr.method.groups import IMAGE
        from livr.method.mask import causal_allowed, query_positions

        blocks = image_blocks(groups, IMAGE)
        q = query_positions(groups, rows)
        bq = blocks[:, q]
        full = causal_allowed(groups, rows) | ((bq[:, :, None] == blocks[:, None, :]) & (bq[:, :, None] > 0))
        text = _text_config(model)
        pos = torch.arange(groups.shape[1], device=groups.device)
        window = ((q[:, None] - pos[None, :]) < text.sliding_window)[None]
        masks = {"full_attention": full, "sliding_attention": full & window}
        return {kind: masks[kind] for kind in set(text.layer_types)}

    def as_mask(self, model, allowed, dtype, rows=None):
        """Per layer type; in a decode step a sliding layer's cache holds only its last sliding_window - 1 keys plus
        the new ones, so its mask keeps only those columns."""
        from livr.method.mask import additive

        out = {kind: additive(a, dtype, rows) for kind, a in allowed.items()}
        if rows is not None and "sliding_attention" in out:
            past = out["sliding_attention"].shape[-1] - rows
            out["sliding_attention"] = out["sliding_attention"][..., -(min(past, _text_config(model).sliding_window - 1) + rows):]
        return out

    def image_grids(self, vision_config, positions, item):
        """Each image's pooled soft tokens: a square grid (mm_tokens_per_image = side²) in row-major order."""
        out = []
        for s, e in contiguous_runs(positions):
            side = int((e - s) ** 0.5)
            out.append((positions[s : s + side * side], side, side))
        return out

    def image_cost(self, io, width, height, images_in_row):
        ip, config = io["image_processor"], io["config"]
        return config.mm_tokens_per_image, 3 * ip.size.height * ip.size.width * 4

    def init_random(self, model) -> None:
        """transformers initialises the projector's input projection to zeros (a checkpoint overwrites it): every
        image would embed to the same vector, so a random preset gets a random one."""
        w = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            w.normal_(0.0, model.config.get_text_config().initializer_range)

    def truncate_depth(self, cfg, n: int):
        """The first n decoder layers (their sliding/full pattern kept) and the first min(n, layers) SigLIP layers."""
        truncate_text(cfg.get_text_config(), n)
        cfg.vision_config.num_hidden_layers = min(n, cfg.vision_config.num_hidden_layers)
        return cfg

    def _tokenizer(self):
        return build_tokenizer(GEMMA_SPECIALS, GEMMA_TEMPLATE, eos_token="<end_of_turn>", pad_token="<pad>",
                               bos_token="<bos>", extra_special_tokens={
                                   "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                   "image_token": "<image_soft_token>"})

    def size_parts(self):
        """google/gemma-3-4b-it's architecture (livr/backbones/configs: 34 layers, 5 sliding : 1 full, window 1024,
        vocab 262,208, tied; SigLIP 27 layers at 896 px, 256 soft tokens per image), the offline tokenizer with
        Gemma's turn tokens, and the checkpoint's image processor settings."""
        tok = self._tokenizer()
        cfg = shipped_config(self.hub_id)
        ids = tok.convert_tokens_to_ids
        cfg.boi_token_index, cfg.eoi_token_index = ids("<start_of_image>"), ids("<end_of_image>")
        cfg.image_token_index = ids("<image_soft_token>")
        text = cfg.get_text_config()
        text.bos_token_id, text.eos_token_id, text.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        return cfg, tok, self.image_processor_class(**self.image_processor_defaults)

    def tiny_parts(self):
        """4 soft tokens per image at any input size (resized to 56x56); 2 decoder layers, a full one then a sliding one
        (window 24: the latents must carry the image first), tied embeddings (as Gemma 3), Gemma's turn format."""
        tok = self._tokenizer()
        ids = tok.convert_tokens_to_ids
        text = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=4096,
                                sliding_window=TINY_SLIDING_WINDOW, layer_types=["full_attention", "sliding_attention"],
                                query_pre_attn_scalar=16, initializer_range=0.1, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=TINY_IMAGE_SIZE, patch_size=14, vision_use_head=False,
                                    initializer_range=0.1)
        cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                           boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                           image_token_index=ids("<image_soft_token>"), initializer_range=0.1,
                           tie_word_embeddings=True)
        ip = Gemma3ImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return cfg, tok, ip
