"""Chat prompt + images + latents + answer -> input ids, labels and a token-group id per position (the groups are
`livr.method.groups`); `collate` pads a batch of them.

Layout of one example (LIVR_SPEC §1–2):

    [text before image][image tokens …][prompt … assistant header][latents][end][answer][<|im_end|>]
     TEXT              IMAGE            PROMPT                      LATENT   ANSWER ANSWER ANSWER

Labels cover the answer tokens and the end-of-turn token only. The delimiter `<livr_latent_end>`
belongs to ANSWER (blind to the image in Stage 1) and carries no loss, so every logit that predicts an
answer token is computed at an image-blind position. With K = 0 there is no delimiter and the answer
follows the assistant header (a PROMPT position), which is image-blind in Stage 1 too.
"""
from __future__ import annotations

import io

import torch
from PIL import Image

from livr.data.images import refuse_bombs
from livr.data.prompts import format_prompt, target_text
from livr.data.tasks import DataError
from livr.method.groups import IGNORE, PAD, token_groups

SEQ_KEYS = ("mm_token_type_ids", "token_type_ids")  # processor outputs aligned with input_ids


def images_of(row: dict) -> list:
    return [row[f"image_{i}"] for i in range(1, 5) if row.get(f"image_{i}") is not None]


class SequenceBuilder:
    """Encodes BLINK rows for one backbone family; the latents are inserted automatically."""

    def __init__(self, tokenizer, processor, family, latent_ids: list[int], answer_format: str = "letter"):
        self.tokenizer, self.processor, self.family = tokenizer, processor, family
        self.latent_ids = list(latent_ids)
        self.latent_text = "".join(tokenizer.convert_ids_to_tokens(self.latent_ids))
        self.image_id = tokenizer.convert_tokens_to_ids(family.image_token)
        self.answer_format = answer_format
        self.position_fn = None  # set by build_model: (ids [1,L], mm) -> positions, precomputed once per example
        self.image_key_fn = None  # set under model.cache_vision: mm -> [images, 16] uint8 digests (livr/model/vision_cache.py)

    def prompt_text(self, row: dict) -> str:
        content = [{"type": "image"} for _ in images_of(row)]
        content.append({"type": "text", "text": format_prompt(row)})
        messages = [{"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + self.latent_text

    def answer_ids(self, row: dict) -> list[int]:
        try:
            text = target_text(row, self.answer_format) + self.family.end_of_turn
        except DataError as e:
            raise DataError(f"{row.get('sub_task', '?')} {e}") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, row: dict, with_answer: bool = True) -> dict:
        """One example: 1-D `input_ids`, `labels`, `groups` (+ the family's image tensors)."""
        where = f"{row.get('sub_task', '?')} idx={row.get('idx')}"
        images = images_of(row)
        answer = self.answer_ids(row) if with_answer else []  # raises DataError for a bad answer letter
        try:
            with refuse_bombs():  # raw bytes: a decompression bomb is refused from its header
                images = [im if isinstance(im, Image.Image) else Image.open(io.BytesIO(im)).convert("RGB") for im in images]
            enc = self.processor(text=[self.prompt_text(row)], images=[images] if images else None, return_tensors="pt")
        except Exception as e:  # noqa: BLE001 - any processor failure is a data problem of this row
            raise DataError(f"{where}: the image processor cannot read this row's image(s): {type(e).__name__}: {e}") from None
        ids = enc["input_ids"][0]
        prompt_len = ids.shape[0]
        ids = torch.cat([ids, torch.tensor(answer, dtype=ids.dtype)])
        labels = torch.full_like(ids, IGNORE)
        labels[prompt_len:] = ids[prompt_len:]
        out = {"input_ids": ids, "labels": labels, "groups": token_groups(ids, self.image_id, self.latent_ids, prompt_len)}
        for key in self.family.forward_keys:
            if key not in enc:
                continue
            value = enc[key]
            if key in SEQ_KEYS:  # extend with text (0) for the answer tokens
                value = torch.cat([value[0], value.new_zeros(len(answer))])
            out[key] = value
        mm = {k: (v[None] if k in SEQ_KEYS else v) for k, v in out.items() if k in self.family.forward_keys}
        if self.position_fn is not None:  # right/left padding never moves a real token's position
            out["position_ids"] = self.position_fn(ids[None], mm).select(-2, 0)
        if self.image_key_fn is not None and "pixel_values" in mm:  # hashed here, in the loader workers
            out["image_keys"] = self.image_key_fn(mm)
        return out


def collate(items: list[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad sequences (input ids with pad, labels with -100, groups with PAD); concatenate image tensors."""
    longest = max(it["input_ids"].shape[0] for it in items)
    fill = {"input_ids": pad_id, "labels": IGNORE, "groups": PAD}
    batch: dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "position_ids":  # [L] or [3, L] (mRoPE) per example -> [B, L] or [3, B, L]
            batch[key] = torch.stack([_pad_last(v, longest, padding_side) for v in values], dim=-2)
        elif key in fill or key in SEQ_KEYS:
            value = fill.get(key, 0)
            padded = []
            for v in values:
                pad = v.new_full((longest - v.shape[0],), value)
                padded.append(torch.cat([v, pad] if padding_side == "right" else [pad, v]))
            batch[key] = torch.stack(padded)
        else:
            batch[key] = _cat_padded(values)
    batch["attention_mask"] = (batch["groups"] != PAD).long()
    return batch


def _pad_last(v: torch.Tensor, n: int, side: str) -> torch.Tensor:
    pad = (0, n - v.shape[-1]) if side == "right" else (n - v.shape[-1], 0)
    return torch.nn.functional.pad(v, pad)


def _cat_padded(values: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding trailing dims to the largest (LLaVA's tile counts)."""
    shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    out = []
    for v in values:
        if list(v.shape[1:]) != shape:
            pad = []
            for d in reversed(range(1, v.dim())):
                pad += [0, shape[d - 1] - v.shape[d]]
            v = torch.nn.functional.pad(v, pad)
        out.append(v)
    return torch.cat(out)
