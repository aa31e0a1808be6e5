"""The token groups of one sequence (LIVR_SPEC §1–2): which part of an example each position belongs to.

    [text before image][image tokens …][prompt … assistant header][latents][end][answer][<|im_end|>]
     TEXT              IMAGE            PROMPT                      LATENT   ANSWER ANSWER ANSWER

The delimiter `<livr_latent_end>` belongs to ANSWER (blind to the image in Stage 1). With K = 0 there is no
delimiter and the answer follows the assistant header (a PROMPT position). PAD marks padding. `livr.data.sequence`
encodes rows into ids, labels and these groups; `livr.method.mask` turns groups into attention rules.
"""
from __future__ import annotations

import torch

TEXT, IMAGE, PROMPT, LATENT, ANSWER, PAD = range(6)
GROUP_NAMES = ("text_before_image", "image", "prompt", "latent", "answer", "pad")
IGNORE = -100  # the label of a position that carries no loss


def token_groups(ids: torch.Tensor, image_id: int, latent_ids: list[int], prompt_len: int) -> torch.Tensor:
    """Group id per position of one unpadded sequence (vectorised)."""
    n = ids.shape[0]
    pos = torch.arange(n)
    groups = torch.full((n,), PROMPT, dtype=torch.long)
    is_img = ids == image_id
    first_img = int(is_img.nonzero()[0]) if is_img.any() else n
    groups[pos < first_img] = TEXT
    groups[is_img] = IMAGE
    if latent_ids:
        groups[torch.isin(ids, torch.tensor(latent_ids[:-1]))] = LATENT
        ends = (ids == latent_ids[-1]).nonzero()
        answer_start = int(ends[0]) if len(ends) else prompt_len
    else:
        answer_start = prompt_len
    groups[pos >= answer_start] = ANSWER
    return groups
