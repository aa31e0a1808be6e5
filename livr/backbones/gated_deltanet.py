"""The Stage-1 visual bottleneck through Gated DeltaNet (linear-attention) layers: two recurrences per layer.

A Gated DeltaNet layer has no attention matrix to mask: position t reads a state S_t that every earlier position
wrote (S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, after a short causal convolution over the
q/k/v inputs). Under the Stage-1 bottleneck the layer therefore runs two recurrences over the same inputs:

    stock  (A): every position writes                      -> read by text-before-image, image, latent (and pad)
    blind  (B): image positions are no-ops for the state   -> read by prompt and answer positions
                (beta = 0: no write; g = 0: exp(g) = 1, no decay) and their inputs to the causal convolution are 0

so a prompt/answer position's output depends on no image position, while image and latent positions see what
causal attention would let them see. Outputs are selected per position before the gated norm and out_proj
(both per-position maps). The two recurrences run as one batch of 2B through the model's own pure-torch kernels
(`causal_conv1d_fn`, `torch_chunk_gated_delta_rule`). With a cache (bottleneck decoding), the cache keeps the
image-blind state (B's convolution window and final recurrent state): every token decoded after the prefix is an
answer token, which reads B; the decode steps then run the stock forward on that state.

Activation: the family's Stage-1 mask is a dict per layer type whose "linear_attention" entry is the additive
[B,1,Q,L] mask carrying `livr_groups` (the token groups [B, L]) and `livr_bottleneck` (True for a Stage-1 mask,
False for the model's own rules as a 4-D mask). `install(cls)` wraps `cls.forward` once: any other
`attention_mask` (None or 2-D: Stage 2, SFT, stock inference, transformers' own generate) runs the stock forward
untouched.

Packed rows (`data.packing`, livr/data/packing.py): several examples concatenated in one row must not share a state.
The family's packed mask is also tagged with `livr_segments`: per row, the (start, end) of each example's contiguous
slice (and of the padding's), found once per forward from the row's `segments`. `livr_forward` then runs each slice
alone, from a fresh state (an empty convolution window, a zero recurrent state), and concatenates the outputs:
the stock forward with the slice's 2-D padding mask (Stage 2) or `two_recurrences` (Stage 1), so every example gets
exactly what it gets unpacked (a padding slice is zeroed like any padding: finite, and read by nothing). Training
only: a packed row takes no cache (a RuntimeError).
"""
from __future__ import annotations

import functools
import itertools
import sys

import torch
import torch.nn.functional as F

from livr.method.groups import ANSWER, IMAGE, PAD, PROMPT

BLIND_GROUPS = (PROMPT, ANSWER)


def tag(mask: torch.Tensor, groups: torch.Tensor, bottleneck: bool, segments: torch.Tensor | None = None):
    """Mark an additive 4-D mask for the Gated DeltaNet layers: their token groups, whether it is Stage 1, and for a
    packed row its `segments` [B, L] (each row's slices, as (start, end) pairs: one host sync per forward)."""
    mask.livr_groups = groups
    mask.livr_bottleneck = bottleneck
    if segments is not None:
        mask.livr_segments = [slices(row) for row in segments]
    return mask


def slices(segments: torch.Tensor) -> list[tuple[int, int]]:
    """[L] example numbers of a packed row -> the (start, end) of each run of equal numbers (an example, padding)."""
    cuts = [0, *(torch.nonzero(segments[1:] != segments[:-1]).flatten() + 1).tolist(), segments.shape[0]]
    return list(itertools.pairwise(cuts))


def install(cls) -> None:
    """Wrap `cls.forward` (a Gated DeltaNet class) so that a tagged 4-D mask runs `livr_forward`; idempotent."""
    if getattr(cls.forward, "_livr_wrapped", False):
        return
    stock = cls.forward

    @functools.wraps(stock)
    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        if attention_mask is None or attention_mask.ndim != 4:
            return stock(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        return livr_forward(self, stock, hidden_states, cache, attention_mask, **kwargs)

    forward._livr_wrapped = True
    cls.forward = forward


def livr_forward(self, stock, hidden_states, cache, mask, **kwargs):
    groups = getattr(mask, "livr_groups", None)
    if groups is None:
        raise RuntimeError(f"{type(self).__name__} layer {self.layer_idx}: a 4-D attention mask without livr's token "
                           "groups reached a linear-attention layer (build it with the family's stage1_mask/as_mask)")
    n = hidden_states.shape[1]
    g = groups[:, -n:].to(hidden_states.device)
    packed = getattr(mask, "livr_segments", None)
    if packed is not None:
        if cache is not None:
            raise RuntimeError(f"{type(self).__name__} layer {self.layer_idx}: a packed row (data.packing) runs "
                               "without a cache (training only); pass use_cache=False")
        return torch.cat([torch.cat([per_example(self, stock, hidden_states[r:r + 1, s:e], g[r:r + 1, s:e],
                                                 mask.livr_bottleneck, **kwargs) for s, e in row], dim=1)
                          for r, row in enumerate(packed)])
    valid = g != PAD
    pad2d = valid.to(hidden_states.dtype)  # (the stock layer only multiplies by it: ones change nothing, no host sync)
    decoding = cache is not None and cache.get_conv_state(self.layer_idx) is not None
    if not mask.livr_bottleneck or decoding:
        if decoding and mask.livr_bottleneck and not bool((torch.isin(g, torch.tensor(BLIND_GROUPS, device=g.device)) | ~valid).all()):
            raise RuntimeError("Stage-1 decoding: the cache holds the image-blind state, so every position after the "
                               "prefix must be a prompt/answer position")
        return stock(self, hidden_states, cache=cache, attention_mask=None if n == 1 else pad2d, **kwargs)
    return two_recurrences(self, hidden_states, g, cache)


def per_example(self, stock, hidden_states, g, bottleneck: bool, **kwargs):
    """One example's slice of a packed row from a fresh state, as if it were alone (its padding slice: zeroed)."""
    if bottleneck:
        return two_recurrences(self, hidden_states, g)
    return stock(self, hidden_states, cache=None, attention_mask=(g != PAD).to(hidden_states.dtype), **kwargs)


def two_recurrences(self, hidden_states, g, cache=None):
    """The Stage-1 forward of one Gated DeltaNet layer over a whole prefix (no earlier state); see module doc."""
    kernels = sys.modules[type(self).__module__]  # the model's own conv / delta-rule functions
    image, blind = g == IMAGE, (g == PROMPT) | (g == ANSWER)
    x = hidden_states * (g != PAD)[..., None].to(hidden_states.dtype)  # as apply_mask_to_padding_states
    b, n, _ = x.shape
    qkv = self.in_proj_qkv(x).transpose(1, 2)  # [B, C, L]
    z = self.in_proj_z(x).reshape(b, n, -1, self.head_v_dim)
    beta = self.in_proj_b(x).sigmoid()
    decay = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
    qkv_blind = blind_conv_input(self, qkv, image)
    conv = kernels.causal_conv1d_fn(torch.cat([qkv, qkv_blind]), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                    activation=self.activation).transpose(1, 2)
    q, k, v = torch.split(conv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    q = q.reshape(2 * b, n, -1, self.head_k_dim)
    k = k.reshape(2 * b, n, -1, self.head_k_dim)
    v = v.reshape(2 * b, n, -1, self.head_v_dim)
    beta_blind, decay_blind = mute_images(self, beta, decay, image)
    beta2, decay2 = torch.cat([beta, beta_blind]), torch.cat([decay, decay_blind])
    out, state = kernels.torch_chunk_gated_delta_rule(q, k, v, g=decay2, beta=beta2, initial_state=None,
                                                      output_final_state=cache is not None, use_qk_l2norm_in_kernel=True)
    core = torch.where(blind[..., None, None], out[b:], out[:b])
    if cache is not None:  # decoding continues with answer tokens: keep the image-blind state
        conv_in, rec = decode_state(qkv, qkv_blind, state[:b], state[b:])
        cache.update_conv_state(conv_in, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        cache.update_recurrent_state(rec, self.layer_idx)
    core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim)).reshape(b, n, -1)
    return self.out_proj(core)


def blind_conv_input(layer, qkv: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The image-blind recurrence's convolution input [B, C, L]: zero at image positions."""
    return qkv.masked_fill(image[:, None, :], 0.0)


def mute_images(layer, beta: torch.Tensor, decay: torch.Tensor, image: torch.Tensor):
    """The image-blind recurrence's write strength and log-decay [B, L, H]: beta = 0 (no write) and g = 0 (exp(g) = 1,
    no decay) at image positions, so an image position leaves the state as it found it."""
    mute = image[..., None]
    return beta.masked_fill(mute, 0.0), decay.masked_fill(mute, 0.0)


def decode_state(qkv, qkv_blind, state, state_blind):
    """What the cache keeps after a Stage-1 prefix: the image-blind recurrence's convolution inputs and final state
    (every decoded token is an answer token)."""
    return qkv_blind, state_blind
