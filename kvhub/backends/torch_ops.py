"""The PyTorch backend: any device, any dtype, any number of queries (long prefill chunks against stored history
are tiled so the score matrix stays bounded: ``SCORE_ELEMENTS``). The reference every other backend is held to,
and the fallback for what they do not handle.

With keys stored as raw values ``c`` against the plan's matrix ``[W_k | mean_k]`` and values against ``[W_v |
mean_v]`` (:mod:`kvhub.plan`)::

    q . k_t         = (q W_k) . (s_t c_t) + q . mean_k       (one d x r product per query, not per key)
    sum_t p_t v_t   = (sum_t p_t s_t c_t) W_v^T + (sum_t p_t) mean_v

Keys coded before RoPE (:mod:`kvhub.rope`) are the exception: each must be turned by its own position, so their
scores come from the keys decoded and turned (``q . k_t`` over ``d``, not ``r``); values keep the path above.

Secondary sinks (:mod:`kvhub.secondary_sinks`) are restored on top: a kept token-head's residual ``(dk, dv)``
adds ``q . dk`` to its score before the softmax and ``p dv`` to the output after it, so it is attended exactly.

Grouped-query heads are handled by viewing the queries as ``[batch, kv_heads, group * q_len, d]``, so K/V are never
repeated; sink and recent tokens (exact) join the same softmax. Per-token scales ``s_t`` multiply the small
``[queries, tokens]`` products, never the history itself.
"""

from __future__ import annotations

import torch

from .base import Capabilities, DecodeBackend, DecodeCall

SCORE_ELEMENTS = 1 << 26  # fp32 scores of one query tile: 256 MB at most, whatever the chunk and context
SCRATCH_QUERY_TOKENS = 16  # calls with at most this many queries (decode steps) reuse the cache's scratch


def history_scores(g: torch.Tensor, raw: list[torch.Tensor], scales: torch.Tensor | None, plan) -> torch.Tensor:
    """``q . x_t`` [B*H, M, T] for every stored token, from ``g = q @ plan.matrix`` [B*H, M, rank + 1] and the raw
    values of each segment [B*H, planes, T, width]: per segment one product per plane, accumulated in place (no
    [planes, M, T] intermediate: in a prefill tile M*T is large), then its per-token scale, onto ``q . mean``."""
    scores = g[..., -1:]
    for seg, c in zip(plan.segments, raw):
        part = None
        for j in range(seg.planes):
            cols = g[..., seg.start + j * seg.width : seg.start + (j + 1) * seg.width]
            if part is None:
                part = torch.bmm(cols, c[:, j].transpose(-1, -2))
            else:
                part.baddbmm_(cols, c[:, j].transpose(-1, -2))
        if seg.scale is None:
            scores = part.add_(scores)
        else:
            scores = torch.addcmul(scores, part, scales[..., seg.scale].unsqueeze(-2))
    return scores


def history_values(p: torch.Tensor, raw: list[torch.Tensor], scales: torch.Tensor | None, plan) -> torch.Tensor:
    """The coordinates [B*H, M, rank + 1] of ``sum_t p_t x_t`` against ``plan.matrix``: the weights (times each
    segment's per-token scale) against each plane of raw values, then the weights' sum for the mean."""
    parts = []
    for seg, c in zip(plan.segments, raw):
        w = p if seg.scale is None else p * scales[..., seg.scale].unsqueeze(-2)
        parts += [torch.bmm(w, c[:, j]) for j in range(seg.planes)]
    return torch.cat([*parts, p.sum(-1, keepdim=True)], -1)


def restore_scores(scores: torch.Tensor, q: torch.Tensor, sinks) -> None:
    """Add ``q . dk`` to each kept token-head's score: ``scores`` [B*H, M, T], ``q`` [B*H, M, d] (scaled), ``sinks``
    ``(rows, tokens, residuals)`` (:meth:`~kvhub.backends.base.DecodeCall.sinks`)."""
    rows, tokens, residuals = sinks
    dots = torch.einsum("nmd,nd->nm", q[rows], residuals[:, 0])
    queries = torch.arange(q.shape[1], device=q.device)
    scores.index_put_((rows[:, None], queries[None, :], tokens[:, None]), dots, accumulate=True)


def restore_values(out: torch.Tensor, probs: torch.Tensor, sinks) -> None:
    """Add ``p dv`` of each kept token-head to ``out`` [B*H, M, d], ``probs`` [B*H, M, T] the softmax."""
    rows, tokens, residuals = sinks
    queries = torch.arange(probs.shape[1], device=probs.device)
    weights = probs[rows[:, None], queries[None, :], tokens[:, None]]  # [N, M]
    out.index_put_((rows,), weights[..., None] * residuals[:, None, 1], accumulate=True)


class TorchBackend(DecodeBackend):
    name = "torch"
    capabilities = Capabilities(
        devices=("cpu", "cuda"), max_query_tokens=None,
        query_dtypes=(torch.float16, torch.bfloat16, torch.float32),
        stored_dtypes=(torch.float16, torch.bfloat16, torch.float32),
        scale_dtypes=(torch.float16, torch.uint8),
        keys_before_rope=True, vector_codes=True, secondary_sinks=True,
    )

    # The history's two products; the C backend replaces these with its kernels and keeps the rest.
    def prepare(self, call: DecodeCall):
        """What :meth:`scores` and :meth:`values` read of the history, once per call (all tiles share it). Decode
        steps read it into the cache's scratch (reused every step); a prefill chunk, whose products cost far more
        than faulting fresh pages in, into temporaries freed with the call, so no history-sized buffer outlives a
        chunked prefill."""
        step = call.query.shape[2] <= SCRATCH_QUERY_TOKENS

        def flat(stream, slot):
            raw = [r.flatten(0, 1) for r in stream.raw(0, call.history, slot=slot if step else None)]
            scales = stream.token_scales(0, call.history)
            return raw, None if scales is None else scales.flatten(0, 1)
        if call.keys.rope is not None:  # keys turned back by their positions: [B*H, T, d]
            keys = call.keys.decode(torch.float32, 0, call.history).flatten(0, 1)
            return keys, flat(call.values, "zv")
        return flat(call.keys, "zk"), flat(call.values, "zv")

    def scores(self, g, call, prepared, out):
        raw, scales = prepared[0]
        out[..., : call.history] = history_scores(g, raw, scales, call.keys.plan())

    def values(self, probs, call, prepared):
        raw, scales = prepared[1]
        return history_values(probs[..., : call.history], raw, scales, call.values.plan())

    def attend(self, call: DecodeCall) -> torch.Tensor:
        query = call.query
        bsz, q_heads, q_len, dim = query.shape
        kv_heads = call.exact_k.shape[1]
        group, history = q_heads // kv_heads, call.history
        total = history + call.exact_k.shape[2]
        mask = None  # scores come in the order [history | exact]
        if call.history_mask is not None:
            mask = torch.cat([call.history_mask, call.exact_mask], -1)[:, None]  # [B, 1, M, total]
        heads = bsz * kv_heads
        plan_k, plan_v = call.keys.plan(), call.values.plan()
        prepared = self.prepare(call)
        sinks = call.sinks()
        w_v = plan_v.matrix.transpose(-1, -2)
        exact_k, exact_v = call.exact_k.float().flatten(0, 1), call.exact_v.float().flatten(0, 1)
        q = (query.float() * call.scaling).view(bsz, kv_heads, group, q_len, dim)  # scaled once
        tile = max(1, SCORE_ELEMENTS // (bsz * q_heads * total))
        tiles = []
        for m0 in range(0, q_len, tile):
            m1 = min(q_len, m0 + tile)
            rows = group * (m1 - m0)
            q_t = q[:, :, :, m0:m1].reshape(bsz, kv_heads, rows, dim)
            scores = torch.empty(heads, rows, total, device=query.device)
            if call.keys.rope is not None:
                scores[..., :history] = torch.bmm(q_t.reshape(heads, rows, dim), prepared[0].transpose(-1, -2))
            else:
                self.scores(torch.matmul(q_t, plan_k.matrix).view(heads, rows, -1), call, prepared, scores)
            scores[..., history:] = torch.bmm(q_t.reshape(heads, rows, dim), exact_k.transpose(-1, -2))
            if sinks is not None:
                restore_scores(scores, q_t.reshape(heads, rows, dim), sinks)
            if call.softcap:
                scores = scores.div_(call.softcap).tanh_().mul_(call.softcap)
            if mask is not None:
                scores.view(bsz, kv_heads, group, m1 - m0, total).add_(mask[:, :, None, m0:m1])
            probs = torch.softmax(scores, dim=-1)
            del scores
            coords = self.values(probs, call, prepared)
            o = torch.matmul(coords.view(bsz, kv_heads, rows, -1), w_v).view(heads, rows, dim)
            o.baddbmm_(probs[..., history:], exact_v)
            if sinks is not None:
                restore_values(o, probs, sinks)
            tiles.append(o.view(bsz, kv_heads, group, m1 - m0, dim))
        out = tiles[0] if len(tiles) == 1 else torch.cat(tiles, dim=3)
        return out.view(bsz, q_heads, q_len, dim).transpose(1, 2).contiguous().to(query.dtype)
