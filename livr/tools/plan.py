"""`livr plan`: per-GPU memory and per-rank host RAM of a run, from the backbone's config and the data (no weights).

Parameters are counted exactly by building the model class on the meta device from the config
(`with torch.device("meta"): Cls._from_config(config)`), cut to `model.num_layers` when set; LoRA's trainable
count is r·(in + out) summed over the language-model Linear layers that the family's `lora_target_regex` matches
(what `build_model` adapts), plus the (K+1) latent embedding rows (K latents + the delimiter) of width hidden. So
`trainable = build_model(cfg)`'s trainable parameter count, exactly.

Sequence length L (text + image tokens + latents + answer), from the data or from `--images N --image-size WxH`
(`--seq-len` overrides it): image tokens per image come from the backbone's real processor classes, without
encoding any pixels: Qwen's smart-resize (the image is resized to multiples of patch·merge within
[min_pixels, max_pixels], data.min_pixels / data.max_pixels applied) gives (H/patch/merge)·(W/patch/merge) tokens;
LLaVA-OneVision's anyres gives the base view + the unpadded high-res grid (downsampled to anyres_max_N) + one
newline per grid row for an image alone in its example, and the base view + 1 for each of several images. Text
tokens are the chat template + prompt through the backbone's tokenizer (for a hub id that is not in the local HF
cache: the family's offline BPE, which over-counts English text). From the data, a sample of the configured train
rows is read and the longest row sets L (micro-batches pad to their longest row).

Memory model, per GPU (b = bytes per element of model.dtype: 2 for bf16/fp16 (auto = bf16), 4 for fp32;
P = all parameters, T = trainable, N = GPUs, V = vocab rows, h = hidden, A = labelled tokens per example):
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
             The frozen vision tower stores nothing (no parameter or input needs a gradient); its input,
             μ·pixel_values in model.dtype, is counted here too.
  mask       μ·s²·b           the Stage-1 additive 4-D mask (mode livr)
  logits     μ·A·V·(b + 8 + 4·[b=2])  the LM head runs only at the A positions that predict a labelled token
             (`logits_to_keep`): their logits, fp32 copy and log-softmax, fp32 gradient
  latent rows V·h·b·(2 if the head is tied, else 1), K > 0: PEFT's trainable_token_indices merges the K+1 rows
             into a full copy of the embedding table (and of a tied head, kept for backward) every forward, and
             the backward builds a dense V×h gradient before keeping the rows (measured on CPU for the
             Qwen2.5-VL-3B width: 2 merged copies + 2 dense gradients of 1.16 GiB each allocated per step)
  experts    (MoE) in P; lora.expert_targets adds r·E·(in + out) per targeted 3-D parameter to T, and each forward
             builds the layer's stack W + s·B·A, kept for backward: expert_copies = stack·b per MoE layer (one with
             checkpointing; one transient in evaluation). i = the active width (k experts + a shared one);
             active = P less the (E - k)/E of the experts a token is not routed to
  overhead   1 GiB            CUDA context, kernels, allocator slack
Evaluation (greedy generation of eval.batch_size B rows of length L during training: weights and optimizer states stay
resident, gradients are freed; no activations are kept for backward):
  KV cache   layers·2·B·(L + max_new_tokens)·kv·b
  prefill    B·L·b·(3h + q + 2kv + 2i)      one layer's transient tensors (the layers run one after another)
             + 2·B·heads·L²·b under eager attention (scores + probabilities)
  mask       B·L²·b                          under eval.bottleneck with an additive 4-D mask (flex: a BlockMask, ~0)
  logits     B·V·(b + 4)                     the LM head at the last position only (`logits_to_keep=1`): never B·L·V
  pixels     B × the row's pixel_values in model.dtype
The binding phase is the larger of training's and evaluation's totals.
A GPU of C GB "fits" when the total is at most 0.9·C GiB. Estimates, not measurements: expect ±20%.

Host RAM per rank (GiB):
  process    0.45 GiB measured (python + torch 2.13 + transformers 5.24 + datasets, a model class imported)
  model load P·b while from_pretrained reads the checkpoint and the weights go to the GPU (transient; memory-mapped
             safetensors pages when model.dtype is the checkpoint's dtype, an anonymous copy otherwise); ZeRO-3
             (zero.Init) holds only its partition P·b/N plus the embedding table(s), whole until partitioned
  loader     data.num_workers processes × 0.45 GiB (-1 = one per spare core, counted as the maximum, 4)
  prefetch   workers × 2 (prefetch_factor) micro-batches of encoded rows (1 without workers), each μ × the
             row's fp32 pixel_values (Qwen2.5-VL: 18 MiB per 1024×768 image) + a pinned copy of one batch on GPU
  offload    the CPU-offloaded optimizer states / parameters (ZeRO offload)
  dataset    memory-mapped Arrow (save_to_disk, the hub cache): page cache shared by a node's ranks, not RSS;
             parquet files are read into each rank's RAM (RSS)
  vision     model.cache_vision: up to model.vision_cache_mib of cached image features (the rest on disk)
Peak RSS = process + offload + vision cache + max(model load, loader + prefetch + parquet data).
"""
from __future__ import annotations

import json
import os
import re

from livr.tools.plan_data import backbone_config, sequence_plan

GIB = 1024**3
MIB = 1024**2
GPU_SIZES = (24, 48, 80)
OVERHEAD = 1 * GIB
PROCESS_RSS = int(0.45 * GIB)  # measured here: a fresh python importing torch, transformers, datasets + a model class
PREFETCH_FACTOR = 2  # livr.data.loader.make_loader
AUTO_WORKERS = 4  # data.num_workers=-1: one per spare core, at most 4
def count_parameters(cfg) -> dict:
    """Exact counts from the config: total, language model, vision+projector, LoRA, latent rows, layer max."""
    import torch

    from livr.backbones import experts, preflight
    from livr.model.build import lora_regex
    from livr.tools.plan_data import config_model

    config, source = backbone_config(cfg.model.backbone, cfg.model.cache_dir, getattr(cfg.model, "num_layers", 0),
                                     cfg.model.trust_remote_code)
    family = preflight.family_of(cfg, config)
    preflight.check_backbone(cfg, config, family)
    with torch.device("meta"):
        model = config_model(family, config, cfg.model.trust_remote_code)
    head = model.get_output_embeddings()
    frozen = re.compile(family.frozen_module_regex)
    params = dict(model.named_parameters())  # tied weights appear once
    total = sum(p.numel() for p in params.values())
    vision = sum(p.numel() for n, p in params.items() if frozen.fullmatch(n))
    target = re.compile(lora_regex(family.lora_target_regex, family.lora_targets(cfg.lora.targets)))
    lora, matched = 0, set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and target.fullmatch(name):
            lora += cfg.lora.r * (mod.in_features + mod.out_features)
            matched.add(name.rsplit(".", 1)[-1])
    text = config.get_text_config()
    moe = experts.counts(model, text, cfg.lora.r, cfg.lora.expert_targets)
    lora += moe["expert_lora"]
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
        "intermediate": experts.mlp_width(text), "vocab": text.vocab_size, **moe, "active": total - moe["inactive"],
        "tied": head is not None and head.weight is model.get_input_embeddings().weight,
        "vision_depth": _vision_depth(config),
    }


def _vision_depth(config) -> int:
    v = config.vision_config
    return getattr(v, "depth", None) or getattr(v, "num_hidden_layers", 0)


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


# ----------------------------------------------------------------------------- sequence length from the data
def estimate(c: dict, *, b: int, stage: int, gpus: int, seq: int, micro: int, checkpointing: bool,
             eager: bool = False, lora_dropout: bool = True, livr_mask: bool = True,
             offload_optimizer: bool = False, offload_param: bool = False, labelled: int = 8,
             pixel_bytes: int = 0) -> dict:
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
    acts += micro * pixel_bytes * b / 4  # the vision tower's input, in model.dtype
    mask = micro * seq * seq * b if livr_mask else 0
    logits = micro * min(labelled, seq) * c["vocab"] * (b + 8 + (4 if b < 4 else 0))
    rows = c["vocab"] * h * b * (2 if c.get("tied") else 1) if c["latent_rows"] else 0
    copies = c.get("expert_layer_copy", 0) * b * (1 if checkpointing else c.get("expert_layers", 0))
    out = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts, "mask": mask,
           "logits": logits, "latent_rows": rows, "expert_copies": copies, "overhead": OVERHEAD}
    out["total"] = sum(out.values())
    out["cpu_offload"] = cpu
    return out


def estimate_eval(c: dict, train: dict, *, b: int, seq: int, batch: int, new_tokens: int, eager: bool = False,
                  bottleneck_mask: bool = False, pixel_bytes: int = 0) -> dict:
    """Bytes per GPU while evaluating (see the module docstring); `train`: the same setting's training estimate,
    whose weights and optimizer states stay resident."""
    h, q, kv, i = c["hidden"], c["q_dim"], c["kv_dim"], c["intermediate"]
    out = {"weights": train["weights"], "optimizer": train["optimizer"],
           "kv_cache": c["layers"] * 2 * batch * (seq + new_tokens) * kv * b,
           "prefill": batch * seq * b * (3 * h + q + 2 * kv + 2 * i) + (2 * batch * c["heads"] * seq * seq * b if eager else 0)
           + c.get("expert_layer_copy", 0) * b,  # one MoE layer's parametrised expert stack (lora.expert_targets)
           "mask": batch * seq * seq * b if bottleneck_mask else 0,
           "logits": batch * c["vocab"] * (b + 4), "pixels": batch * pixel_bytes * b / 4, "overhead": OVERHEAD}
    out["total"] = sum(out.values())
    return out


def loader_workers(cfg) -> tuple[int, str]:
    """(loader processes per rank, how that was decided) from data.num_workers (-1: counted as the maximum)."""
    n = getattr(cfg.data, "num_workers", 2)
    if n < 0:
        return AUTO_WORKERS, f"data.num_workers={n}: one per spare core, counted as the maximum, {AUTO_WORKERS}"
    return n, f"data.num_workers={n}"


def host_ram(c: dict, *, b: int, stage: int, gpus: int, micro: int, cpu_offload: float, workers: int,
             pixel_bytes: int, dataset: dict | None, gpu: bool = True, vision_cache: int = 0) -> dict:
    """Bytes of host RAM per rank by component (see the module docstring); `vision_cache`: the frozen-vision
    cache's memory budget (model.vision_cache_mib, bytes), an upper bound."""
    n = max(1, gpus)
    load = c["total"] * b
    if stage >= 3:  # zero.Init: the rank's partition + the embedding table(s), whole until partitioned
        load = load / n + c["vocab"] * c["hidden"] * b * (1 if c.get("tied") else 2)
    batches = workers * PREFETCH_FACTOR if workers else 1
    prefetch = (batches + (1 if gpu else 0)) * micro * pixel_bytes
    loader = workers * PROCESS_RSS
    data_rss = dataset["bytes"] if dataset and not dataset["mapped"] else 0
    out = {"process": PROCESS_RSS, "model_load": load, "loader_workers": loader, "prefetch": prefetch,
           "offload": cpu_offload, "dataset_rss": data_rss,
           "page_cache": dataset["bytes"] if dataset and dataset["mapped"] else 0, "vision_cache": vision_cache}
    out["peak"] = PROCESS_RSS + cpu_offload + vision_cache + max(load, loader + prefetch + data_rss)
    return out


def plan(cfg, seq_len: int | None = None, *, images: int = 0, image_size: tuple[int, int] | None = None,
         sample: int = 16) -> dict:
    """Counts, the sequence (from seq_len, or images × image_size, or the data), the configured setting's per-GPU
    estimate (with and without gradient checkpointing), host RAM per rank, a ZeRO-3 table over 1/2/4/8 GPUs and a
    recommendation. With seq_len and no images, no data is read (prefetch then counts no pixels)."""
    c = count_parameters(cfg)
    z = zero_settings(cfg.distributed.deepspeed)
    b = 4 if cfg.model.dtype == "float32" else 2
    seq = {"source": f"--seq-len {seq_len}", "labelled": 8, "pixel_bytes": 0, "dataset": None}
    if seq_len is None or images:
        try:
            seq = sequence_plan(cfg, images=images, image_size=image_size, sample=sample)
        except Exception as e:  # unreadable data: say so and plan for a default length
            if images:
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            seq = {"source": f"the data could not be read ({type(e).__name__}: {first}); assumed 1024 tokens - give "
                             "--images N --image-size WxH or --seq-len", "labelled": 8, "pixel_bytes": 0,
                   "dataset": None}
    seq["seq_len"] = seq_len or seq.get("seq_len", 1024)
    seq_len = seq["seq_len"]
    workers, workers_how = loader_workers(cfg)
    setting = {"dtype": "float32" if b == 4 else ("float16" if cfg.model.dtype == "float16" else "bfloat16"),
               "zero_stage": z["stage"], "gpus": max(1, cfg.distributed.num_workers), "seq_len": seq_len,
               "micro_batch": cfg.train.micro_batch_size, "lora_r": cfg.lora.r,
               "gradient_checkpointing": cfg.model.gradient_checkpointing, "loader_workers": workers,
               "eval_batch": cfg.eval.batch_size,
               "loader_workers_how": workers_how, "num_layers": getattr(cfg.model, "num_layers", 0), **z}
    common = {"b": b, "seq": seq_len, "micro": cfg.train.micro_batch_size,
              "eager": cfg.model.attn_implementation == "eager", "lora_dropout": cfg.lora.dropout > 0,
              "livr_mask": cfg.train.mode == "livr", "labelled": seq["labelled"], "pixel_bytes": seq["pixel_bytes"]}
    configured = {ck: estimate(c, stage=z["stage"], gpus=setting["gpus"], checkpointing=ck, **common,
                               offload_optimizer=z["offload_optimizer"], offload_param=z["offload_param"])
                  for ck in (False, True)}
    stage1 = cfg.model.attn_implementation
    evaluation = {ck: estimate_eval(c, configured[ck], b=b, seq=seq_len, batch=cfg.eval.batch_size,
                                    new_tokens=cfg.eval.max_new_tokens, eager=stage1 == "eager",
                                    bottleneck_mask=cfg.eval.bottleneck and stage1 in ("sdpa", "eager"),
                                    pixel_bytes=seq["pixel_bytes"]) for ck in (False, True)}
    for ck in (False, True):  # what the GPU must hold: the larger of the two phases
        configured[ck]["train_total"], configured[ck]["eval_total"] = configured[ck]["total"], evaluation[ck]["total"]
        configured[ck]["binds"] = "evaluation" if evaluation[ck]["total"] > configured[ck]["total"] else "training"
        configured[ck]["total"] = max(configured[ck]["total"], evaluation[ck]["total"])
    zero3 = {n: estimate(c, stage=3, gpus=n, checkpointing=True, **common)["total"] for n in (1, 2, 4, 8)}
    zero3_offload = estimate(c, stage=3, gpus=1, checkpointing=True, offload_optimizer=True, offload_param=True,
                             **common)["total"]
    host = host_ram(c, b=b, stage=z["stage"], gpus=setting["gpus"], micro=cfg.train.micro_batch_size,
                    cpu_offload=configured[cfg.model.gradient_checkpointing]["cpu_offload"], workers=workers,
                    pixel_bytes=seq["pixel_bytes"], dataset=seq.get("dataset"),
                    vision_cache=(cfg.model.vision_cache_mib << 20) if cfg.model.cache_vision else 0)
    return {"counts": c, "setting": setting, "sequence": seq, "configured": {"no_checkpointing": configured[False],
            "checkpointing": configured[True]}, "evaluation": {"no_checkpointing": evaluation[False],
            "checkpointing": evaluation[True]}, "host": host, "zero3_checkpointing": zero3,
            "zero3_offload_1gpu": zero3_offload, "recommendation": recommend(configured, zero3, zero3_offload, setting)}


def fits(total: float) -> int | None:
    """Smallest GPU size (GB) in GPU_SIZES whose 90% holds `total` bytes, else None."""
    return next((g for g in GPU_SIZES if total <= 0.9 * g * GIB), None)


def recommend(configured: dict, zero3: dict, zero3_offload: float, s: dict) -> str:
    text = _recommend(configured, zero3, zero3_offload, s)
    ck = configured[s["gradient_checkpointing"]]
    if ck["binds"] == "evaluation":
        text += (f"; evaluation binds ({ck['eval_total'] / GIB:.1f} GiB at eval.batch_size={s['eval_batch']} vs "
                 f"{ck['train_total'] / GIB:.1f} GiB training): a smaller eval.batch_size lowers the peak")
    return text


def _recommend(configured: dict, zero3: dict, zero3_offload: float, s: dict) -> str:
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
    return ("does not fit even with ZeRO-3 + CPU offload at this sequence length: cap the image resolution "
            "(data.max_pixels) or shorten the micro-batch")


def format_plan(p: dict) -> str:
    c, s, q, hst = p["counts"], p["setting"], p["sequence"], p["host"]
    a, g = p["configured"]["no_checkpointing"], p["configured"]["checkpointing"]
    targets = ",".join(t for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                       if t in c["lora_targets"])
    depth = f" (model.num_layers={s['num_layers']})" if s["num_layers"] else ""
    lines = [
        f"livr plan: {c['backbone']} ({c['family']}; config: {c['config_source']})",
        f"  parameters   {c['total']:,} (language model {c['language_model']:,}, vision + projector {c['vision']:,})",
        *([(f"  experts      {c['experts']:,} in {c['num_experts']} routed experts per MoE layer, "
           f"{c['experts_per_token']} per token: active {c['active']:,} per token")] if c["experts"] else []),
        (f"  trainable    {c['trainable']:,} = LoRA r{s['lora_r']} on {targets or 'nothing'} {c['lora']:,}"
         + (f" (experts {c['expert_lora']:,})" if c["expert_lora"] else "") + f" + latent rows {c['latent_rows']:,}"),
        (f"  LM shape     hidden {c['hidden']}, layers {c['layers']}{depth}, heads {c['heads']}, q {c['q_dim']}, "
         f"kv {c['kv_dim']}, MLP {c['intermediate']}, vocab {c['vocab']}, head {'tied' if c['tied'] else 'untied'}; "
         f"vision depth {c['vision_depth']}"),
    ]
    if "image" in q:
        per = q["per_image"]
        imgs = (f"{q['images']} × {per[0]:,}" if len(set(per)) == 1 else " + ".join(f"{t:,}" for t in per)) if per else "0"
        lines += [
            (f"  sequence     {q['seq_len']:,} tokens (longest of {q['rows']}; mean {q['mean_seq_len']:,.0f}) = image "
             f"{q['image']:,} ({imgs}) + text {q['text']:,} + latents {q['latents']} + answer {q['labelled']} "
             f"(labelled)"),
            f"               from {q['source']}",
            f"               images: {q['processor']} [{q['processor_source']}]",
            f"               text: tokenizer of {q['tokenizer_source']}",
        ]
    else:
        lines.append(f"  sequence     {q['seq_len']:,} tokens ({q['source']})")
    lines += [
        f"  setting      {s['dtype']}, ZeRO-{s['zero_stage']}"
        + (" + offload optimizer" if s["offload_optimizer"] else "") + (" + offload params" if s["offload_param"] else "")
        + f", {s['gpus']} GPU(s), micro-batch {s['micro_batch']}, sequence {s['seq_len']} tokens",
        f"  per GPU (GiB)         {'no ckpt':>9} {'grad ckpt':>10}",
    ]
    for key in ("weights", "gradients", "optimizer", "activations", "mask", "logits", "latent_rows", "expert_copies",
                "overhead", "train_total"):
        lines.append(f"    {key:<19} {a[key] / GIB:9.2f} {g[key] / GIB:10.2f}")
    ea, eg = p["evaluation"]["no_checkpointing"], p["evaluation"]["checkpointing"]
    lines.append(f"  evaluating (batch {s['eval_batch']}, same GPU)")
    for key in ("kv_cache", "prefill", "mask", "logits", "pixels"):
        lines.append(f"    {key:<19} {ea[key] / GIB:9.2f} {eg[key] / GIB:10.2f}")
    lines.append(f"    {'eval_total':<19} {ea['total'] / GIB:9.2f} {eg['total'] / GIB:10.2f}   (incl. weights, optimizer, overhead)")
    lines.append(f"    {'total (peak)':<19} {a['total'] / GIB:9.2f} {g['total'] / GIB:10.2f}   binds: {a['binds']} / {g['binds']}")
    if a["cpu_offload"]:
        lines.append(f"    CPU RAM (offload)   {a['cpu_offload'] / GIB:9.2f}")
    z3 = ", ".join(f"{n}: {t / GIB:.1f}" for n, t in p["zero3_checkpointing"].items())
    lines.append(f"  ZeRO-3 + grad ckpt, GiB per GPU by #GPUs: {z3}; ZeRO-3 + offload (1 GPU): "
                 f"{p['zero3_offload_1gpu'] / GIB:.1f}")
    w = s["loader_workers"]
    px = f"{q['pixel_bytes'] / MIB:,.1f} MiB pixel_values per row" if q["pixel_bytes"] else "pixels unknown: no data read"
    lines += [
        "  host RAM per rank (GiB)",
        f"    process             {hst['process'] / GIB:9.2f}   python + torch + transformers (measured)",
        (f"    model load          {hst['model_load'] / GIB:9.2f}   the weights on their way to the GPU (transient)"
         + (", ZeRO-3: the partition + embedding tables" if s["zero_stage"] >= 3 else "")),
        f"    loader workers      {hst['loader_workers'] / GIB:9.2f}   {w} × {PROCESS_RSS / GIB:.2f} ({s['loader_workers_how']})",
        (f"    prefetch            {hst['prefetch'] / GIB:9.2f}   "
         f"{(w * PREFETCH_FACTOR if w else 1) + 1} batches × micro-batch {s['micro_batch']} × {px}"),
    ]
    if hst["offload"]:
        lines.append(f"    offload             {hst['offload'] / GIB:9.2f}   ZeRO CPU offload")
    if hst["dataset_rss"]:
        lines.append(f"    dataset (parquet)   {hst['dataset_rss'] / GIB:9.2f}   read into each rank's RAM")
    if hst["vision_cache"]:
        lines.append(f"    vision cache        {hst['vision_cache'] / GIB:9.2f}   at most (model.vision_cache_mib; "
                     "beyond it: model.vision_cache_dir)")
    lines.append(f"    peak RSS            {hst['peak'] / GIB:9.2f}   process + offload + vision cache + max(model load, "
                 "loader + prefetch + data)")
    if hst["page_cache"]:
        lines.append(f"    dataset             {hst['page_cache'] / GIB:9.2f}   memory-mapped Arrow: page cache shared "
                     "by the node's ranks, not RSS")
    lines.append(f"  recommendation: {p['recommendation']}")
    return "\n".join(lines)
