"""LLaVA-OneVision in transformers format (e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf): the family, its tiny
preset and its real-size preset (llava-hf/llava-onevision-qwen2-7b-ov-hf, the checkpoint configs/paper/
llava-onevision-7b uses).

Image tokens (anyres): one image alone in its example gets the base view ((image_size/patch)^2 tokens) + the
unpadded high-res grid picked from image_grid_pinpoints (downsampled when larger than `anyres_max_N` base views)
+ one newline token per grid row. With several images in one example every image gets only the base view + 1
newline token. The processor and the model compute the same count when built from the same config.
"""
from typing import ClassVar

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from ..base import Family, contiguous_runs, make_processor, register, set_token_ids, shipped_config, truncate_text
from ..tokenizer import IM_END, IM_START, LLAVA_TEMPLATE, PAD, build_tokenizer
from .qwen2_5_vl import TINY_TEXT

TINY_IMAGE_SIZE = 56  # SigLIP input; patch 14 -> 4x4 = 16 base tokens
TINY_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]
TINY_ASPECT = "anyres_max_1"  # high-res grid downsampled to ~1 base view: 112x112 -> 16 + 4*4 + 4 = 36 tokens


@register
class LlavaOnevision(Family):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    model_class = LlavaOnevisionForConditionalGeneration
    processor_class = LlavaOnevisionProcessor
    image_processor_class = LlavaOnevisionImageProcessorPil
    image_token = "<image>"
    assistant_header = "<|im_start|>assistant\n"
    end_of_turn = "<|im_end|>"
    forward_keys = ("pixel_values", "image_sizes", "batch_num_images")
    rope = "1d"
    # the SigLIP tower has self_attn.q_proj/... too: anchor on language_model
    lora_target_regex = r"(.*\.)?language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    # vision tower, projector and the learned image_newline vector (a bare parameter of the projector path)
    frozen_module_regex = r"(.*\.)?(vision_tower|multi_modal_projector|image_newline)(\..*)?"
    tiny_preset, size_preset = "tiny-llava-onevision", "size-llava-onevision-7b"
    hub_id = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    # its image processor: SigLIP's 384x384 view, normalised with mean = std = 0.5, anyres over 36 grid pinpoints
    # (384..2304 in steps of 384 on each side; the class default)
    image_processor_defaults: ClassVar[dict] = {"size": {"height": 384, "width": 384}, "image_mean": [0.5, 0.5, 0.5],
                                "image_std": [0.5, 0.5, 0.5]}

    def processor_kwargs(self, config) -> dict:
        v = config.vision_config
        return {"num_image_tokens": (v.image_size // v.patch_size) ** 2, "image_token": self.image_token,
                "vision_feature_select_strategy": config.vision_feature_select_strategy,
                "vision_aspect_ratio": config.vision_aspect_ratio}

    def image_grids(self, vision_config, positions, item):
        """The base view's (image_size/patch)^2 tokens that open each image's run of tokens (the whole image resized
        to a square); the high-resolution tiles and newline tokens are not drawn."""
        side = vision_config.image_size // vision_config.patch_size
        out = []
        for s, e in contiguous_runs(positions):
            if e - s >= side * side:
                out.append((positions[s : s + side * side], side, side))
        return out

    def image_cost(self, io, width, height, images_in_row):
        from transformers.image_processing_utils import select_best_resolution

        ip, config = io["image_processor"], io["config"]
        side = ip.size.height
        bh, bw = select_best_resolution((height, width), ip.image_grid_pinpoints)
        views = 1 if images_in_row > 1 else 1 + (bh // side) * (bw // side)  # several images: the base view only
        pixel_bytes = views * 3 * side * side * 4
        proc = io.get("processor")
        if proc is None:
            proc = io["processor"] = make_processor(self, ip, io["tokenizer"], config)
        if images_in_row > 1:  # several images in one example: the base view + 1 newline each
            tokens = proc.num_image_tokens + 1
        else:
            tokens = proc._get_number_of_features(height, width, side, side)
        return tokens - (config.vision_feature_select_strategy == "default"), pixel_bytes

    def image_pieces(self, config, mm):
        """Per image: its used tiles (alone in its example: the base view + the anyres grid; else the base view
        only), its original size, and whether it was tiled."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        tiled = [n == 1 for n in mm["batch_num_images"].tolist() for _ in range(n)]
        out = []
        for px, size, t in zip(mm["pixel_values"], mm["image_sizes"], tiled):
            n = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if t else 1
            out.append([px[:n], size, torch.tensor([t])])
        return out

    def truncate_depth(self, cfg, n: int):
        """The first n decoder layers and the first min(n, layers) SigLIP layers (in place). The features come from
        the last kept layer (vision_feature_layer -1)."""
        truncate_text(cfg.get_text_config(), n)
        v = cfg.vision_config
        v.num_hidden_layers = min(n, v.num_hidden_layers)
        return cfg

    def tiny_parts(self):
        """112x112 alone -> 36 image tokens, 56x56 -> 16 + 16 + 4 = 36 too (grid 1x1 upsampled view), two images per
        example -> 17 each."""
        tok = build_tokenizer([PAD, IM_START, IM_END, "<image>", "<video>"], LLAVA_TEMPLATE)
        text = Qwen2Config(**TINY_TEXT, vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                           tie_word_embeddings=False)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=TINY_IMAGE_SIZE, patch_size=14, vision_use_head=False,
                                    initializer_range=0.1)
        cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision,
                                   image_token_index=tok.convert_tokens_to_ids("<image>"),
                                   video_token_index=tok.convert_tokens_to_ids("<video>"),
                                   vision_feature_select_strategy="full", vision_feature_layer=-1,
                                   image_grid_pinpoints=TINY_PINPOINTS, vision_aspect_ratio=TINY_ASPECT,
                                   tie_word_embeddings=False, initializer_range=0.1)
        ip = LlavaOnevisionImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
                                             image_grid_pinpoints=TINY_PINPOINTS)
        return cfg, tok, ip

    def size_parts(self):
        """The architecture of llava-hf/llava-onevision-qwen2-7b-ov-hf (Qwen2-7B LM, untied head, vocab 152,128;
        SigLIP-so400m tower cut to 26 layers; anyres_max_9), the offline BPE tokenizer with <image>/<video> and the
        ChatML template."""
        tok = build_tokenizer([PAD, IM_START, IM_END, "<image>", "<video>"], LLAVA_TEMPLATE)
        cfg = shipped_config(self.hub_id)
        set_token_ids(cfg, tok, {"image_token_index": tok.convert_tokens_to_ids("<image>"),
                                 "video_token_index": tok.convert_tokens_to_ids("<video>")})
        return cfg, tok, self.image_processor_class(**self.image_processor_defaults)
