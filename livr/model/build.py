"""build_model(cfg): backbone + K latent tokens + PEFT LoRA, vision encoder and projector frozen.

Trainable: LoRA on the language model's projections (the family's regex) and the K+1 latent rows of the
embedding table (PEFT `trainable_token_indices`); nothing else. `LivrModel.forward` runs one batch under
the Stage-1 bottleneck mask (4-D, explicit positions) or the plain 2-D causal path.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from livr.backbones import Backbone, experts, load_backbone, preflight, resolve_backbone_path
from livr.backbones.declared import declared_family
from livr.config import Config, ConfigError
from livr.data.sequence import SequenceBuilder
from livr.method.groups import IGNORE
from livr.method.latents import add_latent_tokens
from livr.model import attention, flex
from livr.model.device import resolve_device, resolve_dtype
from livr.model.vision_cache import build_vision_cache, check_zero_stage


@dataclass
class LivrModel:
    model: torch.nn.Module  # a PeftModel
    backbone: Backbone
    latent_ids: list[int]
    builder: SequenceBuilder
    base_vocab: int  # rows of the embedding table before the latents were added
    device: torch.device
    dtype: torch.dtype
    vision_cache: object = None  # a livr.model.vision_cache.VisionCache (model.cache_vision)
    attention: attention.AttentionPlan | None = None  # the kernels of Stage 1, Stage 2 and the vision tower

    @property
    def family(self):
        return self.backbone.family

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    def model_inputs(self, batch: dict, bottleneck: bool) -> dict:
        """Forward kwargs for a collated batch: the 4-D bottleneck mask + explicit positions, or 2-D."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}  # pinned
        ids, attn = batch["input_ids"], batch["attention_mask"]
        mm = self.mm_inputs(batch)
        inputs = {"input_ids": ids, **mm}
        pos = batch.get("position_ids")
        if "segments" in batch:  # a packed row (livr/data/packing.py): attention within each example only
            inputs["attention_mask"] = self.packed_mask(batch["groups"], batch["segments"], bottleneck)
            inputs["position_ids"] = pos  # each example's own, restarting at each example
        elif bottleneck:
            inputs["attention_mask"] = self.stage1_mask(batch["groups"])
            inputs["position_ids"] = pos if pos is not None else self.family.position_ids(self.model, ids, attn, mm)
        else:
            inputs["attention_mask"] = attn
            if pos is not None:
                inputs["position_ids"] = pos
        return inputs

    def mm_inputs(self, batch: dict) -> dict:
        """The forward's image inputs of a batch on the device: pixels in the model's dtype, or the cached features
        (`mm_encoder_outputs`) in their place under model.cache_vision."""
        mm = {k: batch[k] for k in self.family.forward_keys if k in batch}
        if "pixel_values" in mm:
            keys = None
            if self.vision_cache is not None:  # the loader's digests, else the same ones (of the pixels as encoded)
                keys = batch["image_keys"] if "image_keys" in batch else self.vision_cache.keys(mm)
            mm["pixel_values"] = mm["pixel_values"].to(self.dtype)
            if keys is not None:
                mm = self.vision_cache.inputs(mm, keys)
        return mm

    def stage1_mask(self, groups: torch.Tensor):
        """The Stage-1 `attention_mask` for the current attention implementation: flex_attention's BlockMask (one
        for every layer), else the family's additive mask(s)."""
        if self.attn_implementation() == flex.NAME:
            return flex.block_mask(self.family, groups.to(self.device))
        return self.family.stage1_mask(self.model, groups, self.dtype)

    def packed_mask(self, groups: torch.Tensor, segments: torch.Tensor, bottleneck: bool):
        """The mask of a packed row: a BlockMask with document ids (flex), else the family's additive mask(s) of
        `packed_allowed` (block-diagonal: causal, the Stage-1 bottleneck inside each example; `Family.packed_mask`)."""
        groups = groups.to(self.device)
        if self.attn_implementation() == flex.NAME:
            return flex.packed_block_mask(self.family, groups, segments, bottleneck)
        return self.family.packed_mask(self.model, groups, segments.to(self.device), bottleneck, self.dtype)

    def forward(self, batch: dict, bottleneck: bool) -> torch.Tensor:
        return self.model(**self.model_inputs(batch, bottleneck), use_cache=False).logits

    def answer_nll(self, batch: dict, bottleneck: bool, module=None) -> tuple[torch.Tensor, int]:
        """(summed next-token NLL over the labelled tokens, their count), with the LM head applied only at the
        positions that predict a labelled token (`logits_to_keep`): the full [B, L, vocab] logits of a
        4k-token multi-image sequence are never built. `module`: what runs the forward (a DDP wrapper).
        The positions are found on the host from the (host) labels and passed as a [B, n] index, n the most
        labelled tokens of a row (shorter rows repeat a position whose target is ignored): no boolean indexing
        on the device, so no host sync."""
        pos, targets, count = labelled_positions(batch["labels"])
        inputs = self.model_inputs(batch, bottleneck)
        pos = pos.to(self.device, non_blocking=True)
        logits = (module or self.model)(**inputs, logits_to_keep=pos, use_cache=False).logits
        targets = targets.to(self.device, non_blocking=True).reshape(-1)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE,
                              reduction="sum")
        return nll, count

    def attn_implementation(self) -> str:
        return getattr(self.model.get_base_model().config, "_attn_implementation", "")

    def set_attn_implementation(self, name: str) -> None:
        """The language model's kernel (the vision tower keeps its own: `livr.model.attention`)."""
        base = self.model.get_base_model()
        vision = getattr(getattr(base.config, "vision_config", None), "_attn_implementation", None) or "sdpa"
        plan = self.attention or attention.AttentionPlan(name, name, vision)  # (no plan: the tower keeps its kernel)
        want = plan.implementation(name, type(base.config)) if name else None
        if want and want != self._current(base, want):
            base.set_attn_implementation(want)

    @staticmethod
    def _current(base, want):
        if not isinstance(want, dict):
            return getattr(base.config, "_attn_implementation", want)
        return {k: getattr(base.config if k == "" else getattr(base.config, k), "_attn_implementation", None)
                for k in want}

    @contextlib.contextmanager
    def bottleneck_attention(self):
        """Stage 1's kernel while a forward takes the Stage-1 mask (evaluation under the bottleneck after Stage 2 ran
        a kernel that takes no 4-D mask, e.g. FlashAttention); the kernel before is restored."""
        before = self.attn_implementation()
        stage1 = self.attention.stage1 if self.attention else before
        if before in (flex.NAME, *attention.MASK_KERNELS) or not stage1:
            yield
            return
        self.set_attn_implementation(stage1)
        try:
            yield
        finally:
            self.set_attn_implementation(self.attention.stage2 if self.attention else before)


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For labels [B, L] (on the host): the positions whose logits predict a labelled token, [B, n] (the logits
    at t - 1 predict the token at t), their targets [B, n] (IGNORE where a row has fewer than n), and the count."""
    labels = labels.cpu()
    keep = labels[:, 1:] != IGNORE
    per_row = keep.sum(1)
    n = max(1, int(per_row.max())) if labels.shape[0] else 1
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n]  # kept first, in order
    valid = torch.arange(n)[None] < per_row[:, None]
    targets = torch.where(valid, labels[:, 1:].gather(1, order), torch.full_like(order, IGNORE))
    return order, targets, int(per_row.sum())


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, per_example: bool = False) -> torch.Tensor:
    """Next-token NLL on labelled (answer) tokens; mean over tokens, or one mean per example."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    mask = labels != IGNORE
    if per_example:
        return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def lora_regex(family_regex: str, targets: list[str]) -> str:
    """Modules that match the family's language-model regex AND end in one of the configured names
    (PEFT full-matches the regex against each module name)."""
    names = "|".join(map(re.escape, targets))
    return rf"(?=(?:{family_regex})$).*\.(?:{names})"


def build_model(cfg: Config, adapter_dir: str | None = None, trainable: bool = True, loading=None) -> LivrModel:
    """Backbone + latents + LoRA on `cfg.model.device`; `adapter_dir` reloads a saved run's adapter.
    `loading` (livr.training.ds_setup.Zero3Loading) builds a ZeRO-3 partitioned backbone."""
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    check_zero_stage(cfg, 3 if loading else 0)
    attention.check(cfg, device)
    path = resolve_backbone_path(cfg.model.backbone, cfg.model.cache_dir, cfg.model.num_layers)
    family = declared_family(cfg.model.family) if cfg.model.family else preflight.registered_family(cfg, path)
    preflight.check_backbone(cfg, preflight.config_at(path, cfg.model.trust_remote_code), family)  # before loading
    kernels = attention.resolve(cfg, device, family)
    bb = load_backbone(
        cfg.model.backbone, cache_dir=cfg.model.cache_dir, dtype=dtype, device=str(device),
        attn_implementation=kernels.implementation(kernels.stage1, getattr(family.model_class, "config_class", None)),
        trust_remote_code=cfg.model.trust_remote_code, num_layers=cfg.model.num_layers,
        family=family if cfg.model.family else None,
    )
    if cfg.data.max_pixels or cfg.data.min_pixels:
        set_pixel_limits(bb.processor.image_processor, cfg.data.min_pixels, cfg.data.max_pixels)
    table = bb.model.get_input_embeddings().weight
    base_vocab = getattr(table, "ds_shape", table.shape)[0]  # (a ZeRO-3 partition's own shape is empty)
    ids = add_latent_tokens(bb.model, bb.tokenizer, cfg.latents.num_latents, init=cfg.latents.init, seed=cfg.latents.init_seed,
                            whole=_zero3_whole)
    for p in bb.model.parameters():
        p.requires_grad_(False)
    with loading.before_peft(bb.model) if loading else contextlib.nullcontext():
        model = _peft(cfg, bb, ids, adapter_dir, trainable)
    model.to(device)
    if cfg.model.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    frozen = re.compile(bb.family.frozen_module_regex)
    leaks = [n for n, p in model.named_parameters() if p.requires_grad and frozen.search(n)]
    if leaks:
        raise RuntimeError(f"vision/projector parameters would train: {leaks[:3]}")
    builder = SequenceBuilder(bb.tokenizer, bb.processor, bb.family, ids, cfg.data.answer_format)
    builder.position_fn = lambda x, mm: bb.family.position_ids(model, x, torch.ones_like(x), mm)
    lm = LivrModel(model, bb, ids, builder, base_vocab, device, dtype, attention=kernels)
    lm.vision_cache = build_vision_cache(cfg, lm)
    return lm


def _zero3_whole(weight: torch.Tensor):
    """A ZeRO-3 partitioned table (built under zero.Init) gathered for a write; a no-op otherwise."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=0)


def set_pixel_limits(image_processor, min_pixels: int, max_pixels: int) -> None:
    """Cap (and floor) the pixels per image of a Qwen-style processor (`size` = {shortest_edge: min pixels,
    longest_edge: max pixels}); 0 keeps the checkpoint's own value."""
    size = getattr(image_processor, "size", None)
    if size is None or getattr(size, "longest_edge", None) is None:
        raise ConfigError(f"config: data.max_pixels/data.min_pixels: {type(image_processor).__name__} has no pixel "
                          "budget (Qwen-style processors only); leave them 0")
    lo, hi = min_pixels or size.shortest_edge, max_pixels or size.longest_edge
    if lo > hi:
        raise ConfigError(f"config: data.min_pixels={lo} exceeds the image processor's max_pixels={hi}")
    image_processor.size = type(size)(**{**dict(size.items()), "shortest_edge": lo, "longest_edge": hi}) \
        if hasattr(size, "items") else {"shortest_edge": lo, "longest_edge": hi}


def untied_head_name(model) -> str | None:
    """Module name of the output head when it does not share the embedding's weight (None when tied or absent)."""
    head = model.get_output_embeddings()
    if head is None or head.weight is model.get_input_embeddings().weight:
        return None
    return next(n for n, m in model.named_modules() if m is head)


def _freeze_head_rows(model, head: str | None) -> None:
    """The untied head's latent rows ride in the adapter (so that stock PEFT reloads them exactly) but never train."""
    if head:
        for name, p in model.named_parameters():
            if f"{head}.token_adapter." in name:
                p.requires_grad_(False)


def _peft(cfg: Config, bb: Backbone, ids: list[int], adapter_dir: str | None, trainable: bool):
    head = untied_head_name(bb.model) if ids else None
    if adapter_dir:
        model = PeftModel.from_pretrained(bb.model, adapter_dir, is_trainable=trainable)
        _freeze_head_rows(model, head)
        return model
    tokens = {"embed_tokens": ids, **({head: ids} if head else {})} if ids else None
    lcfg = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=lora_regex(bb.family.lora_target_regex, bb.family.lora_targets(cfg.lora.targets)),
        trainable_token_indices=tokens,  # the untied head's rows: saved, frozen (see _freeze_head_rows)
        target_parameters=experts.target_parameters(cfg.lora.expert_targets),  # MoE experts (off by default)
    )
    with torch.random.fork_rng(devices=[]):  # LoRA init depends on the seed only (not on whether a
        torch.manual_seed(cfg.train.seed)     # preset was just materialised, which consumes RNG)
        model = get_peft_model(bb.model, lcfg)
    _freeze_head_rows(model, head)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: LoRA with weight decay; the latent embedding rows without (LIVR_SPEC §3)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if "trainable_tokens" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
