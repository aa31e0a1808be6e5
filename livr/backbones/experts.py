"""Routed experts of a MoE backbone: LoRA on them (`lora.expert_targets`) and what `livr plan` counts for them.

In transformers 5.24's MoE models (Qwen3-VL-MoE, Qwen3.5-MoE) each MoE layer keeps its routed experts as two fused
3-D parameters of one module, `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I]; the router
`mlp.gate` is a module of its own (never a LoRA target: livr freezes every base weight and adapts none of it).
`nn.Linear`-based LoRA cannot reach a 3-D parameter; PEFT (0.21) does it through `LoraConfig(target_parameters=...)`
(`peft.tuners.lora.ParamWrapper`): per expert a rank-r pair, stored as one A [r·E, in] and one B [out, r·E], and
each forward of the experts module parametrises the stack as W + (alpha/r)·B_e·A_e (one `baddbmm`). So:
  - trainable parameters: r·E·(in + out) per targeted parameter and layer;
  - memory: the parametrised stack is a new tensor the size of the layer's expert weights, kept for the backward
    (one per MoE layer without gradient checkpointing, one layer's with it);
  - PEFT refuses dropout on a ParamWrapper, so `lora.expert_targets` needs `lora.dropout=0` (checked with the config).
The names in `lora.expert_targets` are the experts' parameter names (`gate_up_proj`, `down_proj`); the adapter's
`target_parameters` are `mlp.experts.<name>` (PEFT matches them as suffixes of the full parameter names, which only
the language model's MoE layers have), so a stock `PeftModel.from_pretrained` reloads them exactly.
"""
from __future__ import annotations

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def target_parameters(names: list[str]) -> list[str] | None:
    """PEFT's `target_parameters` for the configured `lora.expert_targets` (None when off)."""
    return [f"mlp.experts.{n}" for n in names] or None


def num_experts(text_config) -> int:
    """Routed experts per MoE layer of a text config (0: a dense model)."""
    return int(getattr(text_config, "num_experts", 0) or getattr(text_config, "num_local_experts", 0) or 0)


def mlp_width(text_config) -> int:
    """The MLP width one token runs through (activations): dense intermediate_size, or k routed experts' widths plus
    a shared expert's."""
    if not num_experts(text_config):
        return text_config.intermediate_size
    k, width = text_config.num_experts_per_tok, text_config.moe_intermediate_size
    return k * width + (getattr(text_config, "shared_expert_intermediate_size", 0) or 0)


def expert_params(model) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the fused 3-D expert parameters of the language model (names as in the base model)."""
    return {n: tuple(p.shape) for n, p in model.named_parameters()
            if p.ndim == 3 and ".mlp.experts." in n and ".language_model." in f".{n}"}


def counts(model, text_config, r: int, names: list[str]) -> dict:
    """Experts' parameters, the active parameters per token's inactive experts removed, LoRA on the targeted
    expert parameters (r·E·(in + out) each), and the largest layer's expert weights (one parametrised copy)."""
    shapes = expert_params(model)
    e = num_experts(text_config)
    total = sum(_numel(s) for s in shapes.values())
    inactive = total * (e - text_config.num_experts_per_tok) // e if e else 0
    lora = sum(r * s[0] * (s[1] + s[2]) for n, s in shapes.items() if n.rsplit(".", 1)[-1] in names)
    per_layer: dict[str, int] = {}
    for n, s in shapes.items():
        layer = n.split(".mlp.experts.")[0]
        per_layer[layer] = per_layer.get(layer, 0) + (_numel(s) if n.rsplit(".", 1)[-1] in names else 0)
    return {"experts": total, "num_experts": e, "experts_per_token": getattr(text_config, "num_experts_per_tok", 0),
            "inactive": inactive, "expert_lora": lora, "expert_layer_copy": max(per_layer.values(), default=0),
            "expert_layers": sum(1 for v in per_layer.values() if v)}


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def fix_zero3_expert_layout() -> None:
    """transformers 5.24 loads Qwen3-VL-MoE's fused experts through `Transpose(1, 2, check_dims=True)`: it transposes
    a checkpoint tensor unless its shape already equals the model parameter's. Under ZeRO-3 (`zero.Init`) that
    parameter is an empty partition, so a checkpoint already in the model's layout (any checkpoint saved by
    transformers 5, livr's presets included) is transposed: a square stack silently, any other with a size
    mismatch. Compare with the parameter's real shape (`ds_shape`) instead. Idempotent."""
    from transformers.core_model_loading import Transpose

    stock = Transpose.convert
    if getattr(stock, "_livr_ds_shape", False):
        return

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        model, name = kwargs.get("model"), kwargs.get("full_layer_name")
        if self.check_dims and model is not None and name is not None:
            shape = getattr(model.get_parameter(name), "ds_shape", None)
            tensor = next(iter(input_dict.values()))
            tensor = tensor[0] if isinstance(tensor, list) else tensor
            if shape is not None and tuple(tensor.shape) == tuple(shape):
                return {self.get_target_pattern(input_dict, source_patterns, target_patterns): tensor}
        return stock(self, input_dict, source_patterns, target_patterns, **kwargs)

    convert._livr_ds_shape = True
    Transpose.convert = convert
