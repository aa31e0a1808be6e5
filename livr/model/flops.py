"""Model FLOPs of a LIVR training step, from the backbone's config alone (no weights), and device peaks for MFU.

Conventions (PaLM appendix B, adapted to LoRA on a frozen language model and a frozen vision tower):

Language model, per token of an example of S non-pad tokens (L layers, width d, H query heads and Hkv key/value
heads of size h, MLP width f, gated MLP: three d x f matrices):
    N_lm   = L * (d*H*h + 2*d*Hkv*h + H*h*d + 3*d*f)               matmul weights of the decoder (no embedding)
    N_lora = L * r * sum over the LoRA targets of (in + out)        the adapters' weights
    forward           2*N_lm + 2*N_lora + 4*L*H*h*S                 QK^T and AV against the whole context (not halved)
    backward          2*N_lm           + 8*L*H*h*S                  activation gradients through the frozen weights
                    + 4*N_lora                                      activation and weight gradients of the adapters
    per token         4*N_lm + 6*N_lora + 12*L*H*h*S
The frozen weights get no weight gradient (that is the 2*N a full fine-tune adds: 6N becomes 4N). The LM head
is left out: `answer_nll` applies it only at the few positions that predict an answer token.

Vision tower, forward only (frozen, and the pixels need no gradient), per patch of an image of P patches
(Lv blocks, width dv, MLP width fv, gated for Qwen2.5-VL's tower):
    2 * Lv * (4*dv*dv + (3 if gated else 2)*dv*fv) + 4 * Lv * dv * P
Left out when the vision features are cached (model.cache_vision: the tower does not run). Qwen's patch merger
maps merge^2 patches onto one image token, so patches = image tokens * merge^2.
"""
from __future__ import annotations

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched as substrings of torch.cuda.get_device_name()
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
               ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
               ("A10", 125.0), ("A6000", 155.0), ("RTX 6000 Ada", 365.0), ("4090", 165.0), ("3090", 71.0),
               ("V100", 125.0), ("T4", 65.0))

_LORA_SHAPES = {"q_proj": ("d", "q"), "k_proj": ("d", "kv"), "v_proj": ("d", "kv"), "o_proj": ("q", "d"),
                "gate_proj": ("d", "f"), "up_proj": ("d", "f"), "down_proj": ("f", "d")}


def model_config(model):
    """The backbone's config behind a PeftModel, possibly wrapped (DeepSpeed's engine, DDP: `.module`)."""
    model = getattr(model, "module", model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lm_dims(config) -> dict:
    from livr.backbones.experts import mlp_width  # a MoE's f: the k routed experts (+ a shared one) a token runs

    t = _text(config)
    d, layers, heads = t.hidden_size, t.num_hidden_layers, t.num_attention_heads
    h = getattr(t, "head_dim", None) or d // heads
    kv = getattr(t, "num_key_value_heads", None) or heads
    return {"L": layers, "d": d, "H": heads, "h": h, "Hkv": kv, "f": mlp_width(t),
            "q": heads * h, "kv": kv * h}


def lm_params(config) -> int:
    """N_lm: the decoder's matmul weights (attention and gated MLP), embedding and head excluded."""
    m = lm_dims(config)
    return m["L"] * (m["d"] * m["q"] + 2 * m["d"] * m["kv"] + m["q"] * m["d"] + 3 * m["d"] * m["f"])


def lora_params(config, r: int, targets) -> int:
    m = lm_dims(config)
    return m["L"] * r * sum(m[a] + m[b] for t, (a, b) in _LORA_SHAPES.items() if t in targets)


def lm_flops(config, tokens: float, sq_lengths: float, r: int = 16, targets=tuple(_LORA_SHAPES)) -> float:
    """Training FLOPs of the language model for `tokens` tokens whose examples' squared lengths sum to
    `sq_lengths` (sum over examples of S^2: each of an example's S tokens attends to a context of S)."""
    m = lm_dims(config)
    return (4 * lm_params(config) + 6 * lora_params(config, r, targets)) * tokens \
        + 12 * m["L"] * m["H"] * m["h"] * sq_lengths


def lm_flops_per_token(config, seq_len: int, r: int = 16, targets=tuple(_LORA_SHAPES)) -> float:
    return lm_flops(config, 1, seq_len, r, targets)


def vision_dims(config) -> dict | None:
    v = getattr(config, "vision_config", None)
    if v is None:
        return None
    layers = getattr(v, "depth", None) or getattr(v, "num_hidden_layers", 0)
    d = getattr(v, "hidden_size", None) or getattr(v, "embed_dim", 0)
    f = getattr(v, "intermediate_size", None) or int(d * getattr(v, "mlp_ratio", 4))
    gated = getattr(v, "model_type", "").startswith("qwen2_5")
    return {"L": layers, "d": d, "f": f, "gated": gated, "merge": getattr(v, "spatial_merge_size", 1) or 1}


def vision_flops(config, patches: float, sq_patches: float) -> float:
    """Forward FLOPs of the vision tower over `patches` patches whose images' squared patch counts sum to
    `sq_patches`."""
    v = vision_dims(config)
    if not v or not v["L"]:
        return 0.0
    per_patch = 2 * v["L"] * (4 * v["d"] ** 2 + (3 if v["gated"] else 2) * v["d"] * v["f"])
    return per_patch * patches + 4 * v["L"] * v["d"] * sq_patches


def device_peak_tflops(device, configured: float = 0.0) -> float | None:
    """The device's peak in TFLOP/s: `configured` when > 0, else the table's entry for a CUDA device's name;
    None when unknown (then MFU is not logged)."""
    if configured > 0:
        return configured
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_TFLOPS if key in name), None)
