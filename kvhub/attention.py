"""Attention computed from the compressed storage, so decoding never rebuilds K or V.

With keys stored as coefficients ``Z_k`` of a basis ``U_k`` (post-RoPE, so the rotation is already inside the
data) and values as ``Z_v`` of ``U_v`` (read through each stream's :class:`~kvhub.stream.StreamDecoder`)::

    q . k_t         = (q U_k) . z_t + q . mean_k          (scores: one d x r product per query, not per key)
    sum_t p_t v_t   = (sum_t p_t z_t) U_v^T + (sum_t p_t) mean_v

Grouped-query heads are handled by viewing the queries as ``[batch, kv_heads, group * q_len, d]``, so K/V are never
repeated. Sink and recent tokens (exact) join the same softmax. Long query chunks are tiled so the score matrix stays
bounded (``SCORE_ELEMENTS``). Decode steps (up to ``kernels.MAX_QUERY_TOKENS`` queries) run fused kernels of
:mod:`kvhub.kernels` that unpack the codes inside the products: Triton on CUDA, C on CPU (``KVHUB_KERNELS`` forces a
path).

The switch is scoped and keeps the user's kernel: ``with compressed_attention(model):`` sets the model's attention
implementation to ``kvhub_<kernel>`` (``kvhub_sdpa``, ``kvhub_eager``, ``kvhub_flash_attention_2``, ...), whose mask is
the user's kernel's mask; a call whose cache layer has compressed history runs here, every other call (a prefill with
nothing stored yet, uncompressed layers, other caches) goes to the user's kernel unchanged. On exit the model gets its
kernel back.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import kernels
from .kernels import cpu
from .layer import MASKED

PREFIX = "kvhub_"
SCORE_ELEMENTS = 1 << 26  # fp32 scores of one query tile: 256 MB at most, whatever the chunk and context


def is_compressed_attention(name: str | None) -> bool:
    return bool(name) and name.startswith(PREFIX)


def _kernel(name: str, module):
    """The user's attention function: a registered one, or the model's own eager attention."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _additive(mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
    """The kernel's mask as an additive float ``[B|1, 1, M, kv]`` (bool masks: True attends; 2D padding masks are
    widened to the query rows; the causal part of a 2D mask is added by :meth:`CompressedLayer.storage_mask` only
    when the chunk needs one, as flash kernels do themselves)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask.bool()[:, None, None, :].expand(-1, 1, query_length, -1)
        if query_length > 1:
            kv = mask.shape[-1]
            causal = torch.ones(query_length, kv, dtype=torch.bool, device=mask.device).tril_(kv - query_length)
            mask = mask & causal
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, MASKED)
    return mask.float()


def _history_scores(g: torch.Tensor, raw: list[torch.Tensor], scales: torch.Tensor | None, decoder) -> torch.Tensor:
    """``q . x_t`` [B*H, M, T] for every stored token, from ``g = q @ decoder.matrix`` [B*H, M, cols] and the raw
    values of each segment [B*H, planes, T, width]: per segment its offset plus one product per plane, accumulated
    in place (no [planes, M, T] intermediate: in a prefill tile M*T is large), then its per-token scale (on the
    score matrix, never on the history), onto ``q . mean``."""
    scores = g[..., -1:]
    for grp, c in zip(decoder.groups, raw):
        part = torch.zeros((), device=g.device) if grp.offset is None else g[..., grp.offset : grp.offset + 1]
        for j in range(grp.planes):
            cols = g[..., grp.start + j * grp.width : grp.start + (j + 1) * grp.width]
            if j == 0:
                part = torch.baddbmm(part, cols, c[:, j].transpose(-1, -2))
            else:
                part.baddbmm_(cols, c[:, j].transpose(-1, -2))
        if grp.scale is None:
            scores = part.add_(scores)
        else:
            scores = torch.addcmul(scores, part, scales[..., grp.scale].unsqueeze(-2))
    return scores


def _history_values(p: torch.Tensor, raw: list[torch.Tensor], scales: torch.Tensor | None, decoder) -> torch.Tensor:
    """The coordinates [B*H, M, cols] of ``sum_t p_t x_t`` against ``decoder.matrix``: the weights (times each
    segment's per-token scale) against each plane of raw values, then the weights' sums for the offsets and the
    mean."""
    parts, offsets = [], []
    for grp, c in zip(decoder.groups, raw):
        w = p if grp.scale is None else p * scales[..., grp.scale].unsqueeze(-2)
        parts += [torch.bmm(w, c[:, j]) for j in range(grp.planes)]
        if grp.offset is not None:
            offsets.append(w.sum(-1, keepdim=True))
    return torch.cat([*parts, *offsets, p.sum(-1, keepdim=True)], -1)


def _attend_compressed(layer, query, key, value, attention_mask, scaling, softcap):
    bsz, q_heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    n_sink, history = key._kvhub_sink, layer.visible
    total = key.shape[-2] + history
    scaling = dim**-0.5 if scaling is None else scaling
    mask = layer.storage_mask(_additive(attention_mask, q_len), q_len, total)

    keys, values = layer.streams["keys"], layer.streams["values"]
    uniform = keys.codec.quantizer == values.codec.quantizer == "uniform"  # the kernels unpack uniform levels only
    if uniform and q_len <= kernels.MAX_QUERY_TOKENS and kernels.backend(query.device) == "triton":
        history_mask = exact_mask = None
        if mask is not None:  # storage order: sink | history | recent and new
            mask = mask[:, 0].expand(bsz, q_len, total)
            history_mask = mask[..., n_sink : n_sink + history]
            exact_mask = torch.cat([mask[..., :n_sink], mask[..., n_sink + history :]], -1)
        out = kernels.decode_attention(query, keys, values, history, key, value, history_mask, exact_mask, scaling,
                                       softcap)
        return out.transpose(1, 2).contiguous(), None
    # Scores in the order [history | sink, recent, new]: one product for the history, one for the exact tokens.
    if mask is not None:
        mask = torch.cat([mask[..., n_sink : n_sink + history], mask[..., :n_sink], mask[..., n_sink + history :]], -1)
    heads = bsz * kv_heads
    native = q_len <= kernels.MAX_QUERY_TOKENS and kernels.backend(query.device) == "native"
    native = native and cpu.supports(keys) and cpu.supports(values)
    dec_k, dec_v = keys.decoder(), values.decoder()
    if not native:
        raw_k = [r.flatten(0, 1) for r in keys.raw(0, history, slot="zk")]
        raw_v = [r.flatten(0, 1) for r in values.raw(0, history, slot="zv")]
        scales_k, scales_v = (s.flatten(0, 1) if s is not None else None
                              for s in (keys.token_scales(0, history), values.token_scales(0, history)))
    w_v = dec_v.matrix.transpose(-1, -2)
    exact_k, exact_v = key.float().flatten(0, 1), value.float().flatten(0, 1)
    q = (query.float() * scaling).view(bsz, kv_heads, group, q_len, dim)  # scaled once: scores come out scaled
    tile = max(1, SCORE_ELEMENTS // (bsz * q_heads * total))
    tiles = []
    for m0 in range(0, q_len, tile):
        m1 = min(q_len, m0 + tile)
        rows = group * (m1 - m0)
        q_t = q[:, :, :, m0:m1].reshape(bsz, kv_heads, rows, dim)
        g = torch.matmul(q_t, dec_k.matrix).view(heads, rows, -1)
        s_exact = torch.bmm(q_t.reshape(heads, rows, dim), exact_k.transpose(-1, -2))
        if native:
            scores = torch.empty(heads, rows, total, device=query.device)
            cpu.history_scores(g, keys, history, scores)
            scores[..., history:] = s_exact
        else:
            scores = torch.cat([_history_scores(g, raw_k, scales_k, dec_k), s_exact], -1)
        if softcap:
            scores = scores.div_(softcap).tanh_().mul_(softcap)
        if mask is not None:
            scores.view(bsz, kv_heads, group, m1 - m0, total).add_(mask[:, :, None, m0:m1])
        probs = torch.softmax(scores, dim=-1)
        del scores
        if native:
            coords = cpu.history_values(probs, values, history)
        else:
            coords = _history_values(probs[..., :history], raw_v, scales_v, dec_v)
        o = torch.matmul(coords.view(bsz, kv_heads, rows, -1), w_v).view(heads, rows, dim)
        o.baddbmm_(probs[..., history:], exact_v)
        tiles.append(o.view(bsz, kv_heads, group, m1 - m0, dim))
    out = tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=3)
    return out.view(bsz, q_heads, q_len, dim).transpose(1, 2).contiguous().to(query.dtype), None


def _attention_for(kernel_name: str):
    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = getattr(key, "_kvhub_layer", None)
        if layer is None:
            return _kernel(kernel_name, module)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        return _attend_compressed(layer, query, key, value, attention_mask, scaling, kwargs.get("softcap"))

    attend.__name__ = f"{PREFIX}{kernel_name}"
    return attend


def register(kernel_name: str) -> str:
    """Make ``attn_implementation="kvhub_<kernel_name>"`` known to transformers (attention and mask functions)."""
    name = f"{PREFIX}{kernel_name}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _attention_for(kernel_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[kernel_name])
    return name


def enable(model) -> str:
    """Switch ``model`` to compressed attention until :func:`disable`, for scripts that run one model through many
    caches (benchmarks). Returns the user's kernel name. Prefer ``with compressed_attention(model):``."""
    kernel = model.config._attn_implementation or "eager"
    if not is_compressed_attention(kernel):
        model.set_attn_implementation(register(kernel))
    return kernel.removeprefix(PREFIX)


def disable(model) -> None:
    """Give ``model`` its own kernel back after :func:`enable`."""
    kernel = model.config._attn_implementation
    if is_compressed_attention(kernel):
        model.set_attn_implementation(kernel.removeprefix(PREFIX))


@contextmanager
def compressed_attention(model) -> Iterator:
    """Within the block, attention of layers with compressed history reads the codes; everything else runs the
    model's own kernel. The model's attention implementation is restored on exit (also on error)."""
    if is_compressed_attention(model.config._attn_implementation):  # nested: the outer block restores
        yield model
        return
    enable(model)
    try:
        yield model
    finally:
        disable(model)
