"""`livr plan`: per-GPU memory estimate of a run, from the backbone's config alone (no weights).

Parameters are counted exactly by building the model class on the meta device from the config
(`with torch.device("meta"): Cls._from_config(config)`); LoRA's trainable count is r·(in + out) summed over
the language-model Linear layers that the family's `lora_target_regex` matches (what `build_model` adapts),
plus the (K+1) latent embedding rows (K latents + the delimiter) of width hidden. So
`trainable = build_model(cfg)`'s trainable parameter count, exactly.

Memory model, per GPU (b = bytes per element of model.dtype: 2 for bf16/fp16 (auto = bf16), 4 for fp32;
P = all parameters, T = trainable, N = GPUs):
  weights    P·b + T·b        (the frozen base, vision tower included, and the LoRA/latent weights)
  gradients  T·b              (only trainable parameters get gradients)
  optimizer  T·(8 + 4·[b=2])  (AdamW m and v in fp32, + an fp32 master copy under mixed precision)
  ZeRO       stage ≥ 1: optimizer / N; stage ≥ 2: gradients / N; stage 3: weights / N + a gather buffer
             of 2 × the largest decoder layer (current + prefetched). offload_optimizer moves the optimizer
             states to CPU RAM, offload_param (stage 3) the weights.
  activations, per decoder layer, micro-batch μ, sequence s (text + image tokens + latents), hidden h,
             attention width q = heads·head_dim, key/value width kv, MLP width i:
               A_layer = μ·s·b·(4h + 2q + 2kv + 4i)      inputs kept for backward: 2 RMSNorms, q/k/v
                                                            input, q, k, v, attention output, MLP input,
                                                            gate, up, act(gate), gate·up
                       + μ·s·(b+1)·(5h + q + i)           LoRA dropout copies + masks (dropout > 0)
                       + 2·μ·heads·s²·b                   scores + probabilities (eager attention only;
                                                            sdpa/flash kernels do not store them)
             without checkpointing: layers · A_layer; with: layers · μ·s·h·b (layer inputs) + A_layer.
             The frozen vision tower stores nothing (no parameter or input needs a gradient).
  mask       μ·s²·b           the Stage-1 additive 4-D mask (mode livr)
  logits     μ·s·V·(b + 8 + 4·[b=2])  logits, their fp32 copy and log-softmax in the loss, fp32 gradient
  overhead   1 GiB            CUDA context, kernels, allocator slack
A GPU of C GB "fits" when the total is at most 0.9·C GiB. Estimates, not measurements: expect ±20%.
"""
from __future__ import annotations

import json
import os
import re

GIB = 1024**3
GPU_SIZES = (24, 48, 80)
OVERHEAD = 1 * GIB
SHIPPED = os.path.join(os.path.dirname(__file__), "backbones", "configs")


def backbone_config(name_or_path: str, cache_dir: str):
    """(transformers config, where it came from) for a tiny preset, a local dir, a shipped copy, or a hub id."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from livr.backbones import resolve_backbone_path

    path = resolve_backbone_path(name_or_path, cache_dir)
    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path), os.path.join(path, "config.json")
    shipped = os.path.join(SHIPPED, name_or_path.replace("/", "__") + ".json")
    if os.path.isfile(shipped):
        with open(shipped) as f:
            data = json.load(f)
        return CONFIG_MAPPING[data["model_type"]].from_dict(data), shipped
    try:
        return AutoConfig.from_pretrained(name_or_path), f"{name_or_path} (HF cache / hub)"
    except OSError as e:
        raise FileNotFoundError(
            f"cannot read the config of {name_or_path!r} ({str(e).splitlines()[0]}): livr plan needs it from the "
            f"HF cache or the hub (unset HF_HUB_OFFLINE once), or model.backbone=<a local dir with config.json>"
        ) from None


def count_parameters(cfg) -> dict:
    """Exact counts from the config: total, language model, vision+projector, LoRA, latent rows, layer max."""
    import torch

    from livr.backbones import family_for
    from livr.model import lora_regex

    config, source = backbone_config(cfg.model.backbone, cfg.model.cache_dir)
    family = family_for(config.model_type)
    with torch.device("meta"):
        model = family.model_class._from_config(config)
    frozen = re.compile(family.frozen_module_regex)
    params = dict(model.named_parameters())  # tied weights appear once
    total = sum(p.numel() for p in params.values())
    vision = sum(p.numel() for n, p in params.items() if frozen.fullmatch(n))
    target = re.compile(lora_regex(family.lora_target_regex, cfg.lora.targets))
    lora, matched = 0, set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and target.fullmatch(name):
            lora += cfg.lora.r * (mod.in_features + mod.out_features)
            matched.add(name.rsplit(".", 1)[-1])
    text = config.get_text_config()
    h = text.hidden_size
    k = cfg.latents.num_latents
    layers = next(m for n, m in model.named_modules() if re.fullmatch(r"(.*\.)?language_model\.layers", n))
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    return {
        "backbone": cfg.model.backbone, "config_source": source, "family": family.name, "total": total,
        "language_model": total - vision, "vision": vision, "lora": lora, "lora_targets": sorted(matched),
        "latent_rows": (k + 1) * h if k > 0 else 0, "trainable": lora + ((k + 1) * h if k > 0 else 0),
        "layer_max": max(sum(p.numel() for p in m.parameters()) for m in layers),
        "hidden": h, "layers": text.num_hidden_layers, "heads": text.num_attention_heads,
        "q_dim": text.num_attention_heads * head_dim,
        "kv_dim": getattr(text, "num_key_value_heads", text.num_attention_heads) * head_dim,
        "intermediate": text.intermediate_size, "vocab": text.vocab_size,
    }


def zero_settings(path: str) -> dict:
    """ZeRO stage and offload targets from a DeepSpeed JSON ("" = no DeepSpeed: stage 0)."""
    if not path:
        return {"stage": 0, "offload_optimizer": False, "offload_param": False}
    with open(os.path.expanduser(path)) as f:
        zero = json.load(f).get("zero_optimization", {})

    def off(key):
        return zero.get(key, {}).get("device", "none") in ("cpu", "nvme")

    return {"stage": int(zero.get("stage", 0)), "offload_optimizer": off("offload_optimizer"),
            "offload_param": off("offload_param")}


def estimate(c: dict, *, b: int, stage: int, gpus: int, seq: int, micro: int, checkpointing: bool,
             eager: bool = False, lora_dropout: bool = True, livr_mask: bool = True,
             offload_optimizer: bool = False, offload_param: bool = False) -> dict:
    """Bytes per GPU by component (see the module docstring for every formula)."""
    P, T, n = c["total"], c["trainable"], max(1, gpus)
    h, q, kv, i = c["hidden"], c["q_dim"], c["kv_dim"], c["intermediate"]
    weights, grads = (P + T) * b, T * b
    optim = T * (8 + (4 if b < 4 else 0))
    cpu = 0
    if stage >= 1:
        optim /= n
    if stage >= 2:
        grads /= n
    if stage >= 3:
        weights = weights / n + 2 * c["layer_max"] * b
    if offload_optimizer and stage >= 1:
        cpu += optim
        optim = 0
    if offload_param and stage >= 3:
        cpu += weights - 2 * c["layer_max"] * b
        weights = 2 * c["layer_max"] * b
    layer = micro * seq * b * (4 * h + 2 * q + 2 * kv + 4 * i)
    if lora_dropout:
        layer += micro * seq * (b + 1) * (5 * h + q + i)
    if eager:
        layer += 2 * micro * c["heads"] * seq * seq * b
    acts = c["layers"] * micro * seq * h * b + layer if checkpointing else c["layers"] * layer
    mask = micro * seq * seq * b if livr_mask else 0
    logits = micro * seq * c["vocab"] * (b + 8 + (4 if b < 4 else 0))
    out = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts, "mask": mask,
           "logits": logits, "overhead": OVERHEAD}
    out["total"] = sum(out.values())
    out["cpu_offload"] = cpu
    return out


def plan(cfg, seq_len: int = 1024) -> dict:
    """Counts, the configured setting's per-GPU estimate (with and without gradient checkpointing), a ZeRO-3
    table over 1/2/4/8 GPUs and a recommendation."""
    c = count_parameters(cfg)
    z = zero_settings(cfg.distributed.deepspeed)
    b = 4 if cfg.model.dtype == "float32" else 2
    setting = {"dtype": "float32" if b == 4 else ("float16" if cfg.model.dtype == "float16" else "bfloat16"),
               "zero_stage": z["stage"], "gpus": max(1, cfg.distributed.num_workers), "seq_len": seq_len,
               "micro_batch": cfg.train.micro_batch_size, "lora_r": cfg.lora.r,
               "gradient_checkpointing": cfg.model.gradient_checkpointing, **z}
    common = {"b": b, "seq": seq_len, "micro": cfg.train.micro_batch_size,
              "eager": cfg.model.attn_implementation == "eager", "lora_dropout": cfg.lora.dropout > 0,
              "livr_mask": cfg.train.mode == "livr"}
    configured = {ck: estimate(c, stage=z["stage"], gpus=setting["gpus"], checkpointing=ck, **common,
                               offload_optimizer=z["offload_optimizer"], offload_param=z["offload_param"])
                  for ck in (False, True)}
    zero3 = {n: estimate(c, stage=3, gpus=n, checkpointing=True, **common)["total"] for n in (1, 2, 4, 8)}
    zero3_offload = estimate(c, stage=3, gpus=1, checkpointing=True, offload_optimizer=True, offload_param=True,
                             **common)["total"]
    return {"counts": c, "setting": setting, "configured": {"no_checkpointing": configured[False],
            "checkpointing": configured[True]}, "zero3_checkpointing": zero3, "zero3_offload_1gpu": zero3_offload,
            "recommendation": recommend(configured, zero3, zero3_offload, setting)}


def fits(total: float) -> int | None:
    """Smallest GPU size (GB) in GPU_SIZES whose 90% holds `total` bytes, else None."""
    return next((g for g in GPU_SIZES if total <= 0.9 * g * GIB), None)


def recommend(configured: dict, zero3: dict, zero3_offload: float, s: dict) -> str:
    how = f"ZeRO-{s['zero_stage']}, {s['gpus']} GPU(s)"
    plain, ckpt = fits(configured[False]["total"]), fits(configured[True]["total"])
    if plain and not s["gradient_checkpointing"] and plain <= ckpt:
        return f"fits on one {plain} GB GPU per rank as configured ({how})"
    if ckpt:
        note = "" if s["gradient_checkpointing"] else " with model.gradient_checkpointing=true"
        other = f"; without checkpointing: one {plain} GB GPU" if plain and plain != ckpt else ""
        return f"fits on one {ckpt} GB GPU per rank{note} ({how}){other}"
    for n, total in zero3.items():
        if n > 1 and fits(total):
            return (f"does not fit one 80 GB GPU: use ZeRO-3 over {n} GPUs (distributed.deepspeed="
                    f"deepspeed_configs/zero3.json distributed.num_workers={n}, gradient checkpointing on): "
                    f"{total / GIB:.1f} GiB per GPU")
    if fits(zero3_offload):
        return ("does not fit one 80 GB GPU, even with ZeRO-3 over 8: use ZeRO-3 with CPU offload "
                f"(deepspeed_configs/zero3_offload.json): {zero3_offload / GIB:.1f} GiB per GPU")
    return "does not fit even with ZeRO-3 + CPU offload at this sequence length: shorten --seq-len / micro-batch"


def format_plan(p: dict) -> str:
    c, s = p["counts"], p["setting"]
    a, g = p["configured"]["no_checkpointing"], p["configured"]["checkpointing"]
    targets = ",".join(t for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                       if t in c["lora_targets"])
    lines = [
        f"livr plan: {c['backbone']} ({c['family']}; config: {c['config_source']})",
        f"  parameters   {c['total']:,} (language model {c['language_model']:,}, vision + projector {c['vision']:,})",
        (f"  trainable    {c['trainable']:,} = LoRA r{s['lora_r']} on {targets or 'nothing'} {c['lora']:,}"
         f" + latent rows {c['latent_rows']:,}"),
        (f"  LM shape     hidden {c['hidden']}, layers {c['layers']}, heads {c['heads']}, q {c['q_dim']}, "
         f"kv {c['kv_dim']}, MLP {c['intermediate']}, vocab {c['vocab']}"),
        f"  setting      {s['dtype']}, ZeRO-{s['zero_stage']}"
        + (" + offload optimizer" if s["offload_optimizer"] else "") + (" + offload params" if s["offload_param"] else "")
        + f", {s['gpus']} GPU(s), micro-batch {s['micro_batch']}, sequence {s['seq_len']} tokens",
        f"  per GPU (GiB)         {'no ckpt':>9} {'grad ckpt':>10}",
    ]
    for key in ("weights", "gradients", "optimizer", "activations", "mask", "logits", "overhead", "total"):
        lines.append(f"    {key:<19} {a[key] / GIB:9.2f} {g[key] / GIB:10.2f}")
    if a["cpu_offload"]:
        lines.append(f"    CPU RAM (offload)   {a['cpu_offload'] / GIB:9.2f}")
    z3 = ", ".join(f"{n}: {t / GIB:.1f}" for n, t in p["zero3_checkpointing"].items())
    lines.append(f"  ZeRO-3 + grad ckpt, GiB per GPU by #GPUs: {z3}; ZeRO-3 + offload (1 GPU): "
                 f"{p['zero3_offload_1gpu'] / GIB:.1f}")
    lines.append(f"  recommendation: {p['recommendation']}")
    return "\n".join(lines)
