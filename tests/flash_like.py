"""A stand-in for flash-attention on CPU (flash-attn does not install without CUDA), so the conformance tests can run
the flash-attention mask function: transformers' ``flash_attention_2`` mask returns ``None`` when no row is padded
and the 2-D ``[B, kv]`` padding mask otherwise, and the kernel itself applies causality (bottom-right aligned) and
the ``sliding_window`` it is passed. :func:`flash_like_attention` is that contract in plain float32 torch,
registered under :data:`NAME` with the real flash mask function (the name must not contain "flash": transformers
then tries to import a flash-attn package); anything that relies on the mask to hide tokens outside a window
shows up against it exactly as it would under flash-attention on a GPU."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "fa_emulated"


def flash_like_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                         softcap=None, **kwargs):
    """Flash-attention's semantics: ``attention_mask`` None or 2-D padding (nonzero: a real token), query ``i`` of
    ``m`` sits at key position ``kv - m + i`` and sees keys at most ``sliding_window - 1`` before it; a query row with
    no visible key (a left pad) outputs zeros, as flash's unpadded output does. Returns ``[B, m, Hq, d]``."""
    _, q_heads, m, dim = query.shape
    kv = key.shape[-2]
    group = q_heads // key.shape[1]
    k = key.float().repeat_interleave(group, 1)
    v = value.float().repeat_interleave(group, 1)
    scores = query.float() @ k.transpose(-1, -2) * (dim**-0.5 if scaling is None else scaling)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(kv - m, kv, device=query.device)[:, None]
    k_pos = torch.arange(kv, device=query.device)[None, :]
    visible = k_pos <= q_pos
    if sliding_window is not None:
        visible = visible & (k_pos > q_pos - sliding_window)
    visible = visible[None, None]
    if attention_mask is not None:
        assert attention_mask.dim() == 2, "the flash mask function hands kernels a 2-D padding mask or None"
        visible = visible & attention_mask[:, None, None, -kv:].bool()
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, flash_like_attention)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
