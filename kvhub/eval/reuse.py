"""The reuse case for KV at rest: a prefix's K/V is cut into fp16 chunks, stored by a codec and restored, and a later
request reads its continuation against the restored prefix in a plain DynamicCache.

What a stored chunk costs is the continuation's perplexity delta against the exact fp32 prefix, per corpus, with its
standard error over windows (a few windows of one corpus spread by a point or more: the error says how far to trust
a delta). ``benchmarks/lmcache_reuse.py`` measures it through LMCache's own storage path; ``kvhub registry verify``
re-measures a preset's storage budgets with the chunk codec alone, the same bytes without the disk
(:func:`codec_round_trip`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..integrations.chunks import HeadSlice, from_chunks, to_chunks
from ..text import token_windows
from . import delta_pct, standard_error
from .ppl import PerplexityResult, continuation_nll


@dataclass
class ReuseWindow:
    ids: torch.Tensor  # [1, prefix + continuation]
    base: PerplexityResult  # the continuation read against the exact fp32 prefix
    chunks: list[torch.Tensor]  # the prefix's K/V as LMCache receives them: fp16 [2, L, chunk, H*d]


@dataclass(frozen=True)
class ReuseDelta:
    delta_pct: float  # over the corpus's windows together (summed NLL), as the perplexity protocol does
    se: float  # standard error of the per-window deltas' mean


def reuse_windows(model, tokenizer, text: str, count: int, prefix: int, continuation: int,
                  chunk: int) -> list[ReuseWindow]:
    """``count`` windows from the middle of ``text``, each with its exact baseline and its prefix's fp16 chunks."""
    out = []
    for ids in token_windows(tokenizer, text, prefix + continuation, count):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :prefix], cache=cache, use_cache=True)
            keys, values = [la.keys for la in cache.layers], [la.values for la in cache.layers]
            base = continuation_nll(model, ids[:, prefix:], keys, values)
        out.append(ReuseWindow(ids, base, [c.half() for c in to_chunks(keys, values, chunk)]))
    return out


def reuse_delta(model, windows: list[ReuseWindow], restored: list[list[torch.Tensor]], prefix: int,
                head_dim: int) -> ReuseDelta:
    """The continuation's delta with each window's prefix restored from ``restored[i]`` (its chunks, decoded)."""
    pairs = []
    for w, chunks in zip(windows, restored, strict=True):
        with torch.no_grad():
            pairs.append((continuation_nll(model, w.ids[:, prefix:], *from_chunks(chunks, head_dim)), w.base))
    total = [sum((p[i] for p in pairs), PerplexityResult(0.0, 0)) for i in (0, 1)]
    se = standard_error([delta_pct(got, base) for got, base in pairs])
    return ReuseDelta(delta_pct(*total), math.inf if se is None else se)


def codec_round_trip(codec) -> Callable[[torch.Tensor], torch.Tensor]:
    """A chunk through ``codec``'s bytes and back (encode into the buffer its ``nbytes`` sizes, decode): what a
    store and a prefetch do to it, without the store. All heads of the chunk, as one rank holds them."""
    def round_trip(chunk: torch.Tensor) -> torch.Tensor:
        heads = HeadSlice(0, chunk.shape[-1] // codec.shape.head_dim)
        buf = torch.zeros(codec.nbytes(chunk.shape, chunk.dtype, heads), dtype=torch.uint8)
        codec.encode(chunk, buf, heads)
        out = torch.empty_like(chunk)
        codec.decode(buf, out, heads)
        return out
    return round_trip


__all__ = ["ReuseWindow", "ReuseDelta", "reuse_windows", "reuse_delta", "codec_round_trip"]
