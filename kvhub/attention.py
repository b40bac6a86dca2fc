"""Attention computed from the compressed storage, so decoding never rebuilds K or V.

With keys stored as coefficients ``Z_k`` of a basis ``U_k`` (post-RoPE, so the rotation is already inside the
data) and values as ``Z_v`` of ``U_v``::

    q . k_t         = (q U_k) . z_t + q . mean_k          (scores: one d x r product per query, not per key)
    sum_t p_t v_t   = (sum_t p_t z_t) U_v^T + (sum_t p_t) mean_v

Per-token scales fold into the score columns and into the weights; grouped-query heads are handled by viewing the
queries as ``[batch, kv_heads, group * q_len, d]``, so K/V are never repeated. Sink and recent tokens (exact) join
the same softmax. A compressed layer returns only its exact tokens from ``update`` and tags them with itself; any
other layer (stock, sliding-window) goes to SDPA unchanged.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTN_NAME = "kvhub"
_registered = False


def _stock_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """Uncompressed layers: SDPA, or the model's own eager attention for what SDPA cannot do (Gemma-2's softcap)."""
    if kwargs.get("softcap") is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def compressed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = getattr(key, "_kvhub_layer", None)
    if layer is None:
        return _stock_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    bsz, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    n_sink, history = key._kvhub_sink, layer.visible
    q = query.float().reshape(bsz, kv_heads, group * q_len, dim)
    exact_k, exact_v = key.float(), value.float()

    s_exact = q @ exact_k.transpose(-1, -2)
    parts = [s_exact[..., :n_sink]]
    if history:
        parts.append(layer.streams["keys"].attention_scores(q, history))
    parts.append(s_exact[..., n_sink:])
    scores = torch.cat(parts, dim=-1).mul_(scaling)  # in place from here on: at prefill these are [q x T] big
    softcap = kwargs.get("softcap")
    if softcap:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    total = scores.shape[-1]
    scores = scores.view(bsz, kv_heads, group, q_len, total)
    if attention_mask is not None:
        scores.add_(attention_mask[..., -total:].unsqueeze(2))
    elif q_len > 1:
        causal = torch.ones(q_len, total, dtype=torch.bool, device=scores.device).tril(total - q_len)
        scores.masked_fill_(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(bsz, kv_heads, group * q_len, total)
    del scores, parts, s_exact

    out = probs[..., :n_sink] @ exact_v[:, :, :n_sink] + probs[..., n_sink + history :] @ exact_v[:, :, n_sink:]
    if history:
        out = out + layer.streams["values"].attention_values(probs[..., n_sink : n_sink + history], history)
    out = out.view(bsz, kv_heads, group, q_len, dim).reshape(bsz, q_heads, q_len, dim)
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def register() -> None:
    """Make ``attn_implementation="kvhub"`` known to transformers (the attention function and its mask)."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_NAME, compressed_attention)
        AttentionMaskInterface.register(ATTN_NAME, eager_mask)
        _registered = True


def enable(model) -> None:
    """Switch ``model`` to compressed-space attention; caches built for it then skip rebuilding K/V."""
    register()
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
