"""Perplexity under compression (protocol of docs/field-notes.md).

Each window is fed through a fresh cache in chunks, so every token attends to a *compressed* past and to its own
chunk exactly: a single prefill pass would never exercise what a decode-time cache stores."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache

from ..attention import compressed_attention


@dataclass
class PerplexityResult:
    nll_sum: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    def __add__(self, other: PerplexityResult) -> PerplexityResult:
        """Two readings as one text (``sum(results, PerplexityResult(0.0, 0))`` pools windows): NLL and tokens add."""
        return PerplexityResult(self.nll_sum + other.nll_sum, self.tokens + other.tokens)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, cache: Cache, chunk: int = 128) -> PerplexityResult:
    """Summed NLL of ``ids`` [1, T] (all T-1 predicted tokens), read through ``cache`` ``chunk`` tokens at a time."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    nll, count, prev_last = 0.0, 0, None
    for start in range(0, ids.shape[-1], chunk):
        piece = ids[:, start : start + chunk]
        with compressed_attention(model):
            logits = model(input_ids=piece, cache=cache, use_cache=True).logits.float()
        if prev_last is not None:  # the previous chunk's last position predicts this chunk's first token
            nll += F.cross_entropy(prev_last, piece[:, 0], reduction="sum").item()
            count += 1
        if piece.shape[-1] > 1:
            nll += F.cross_entropy(logits[0, :-1], piece[0, 1:], reduction="sum").item()
            count += piece.shape[-1] - 1
        prev_last = logits[:, -1]
    return PerplexityResult(nll, count)


def perplexity(model, windows: list[torch.Tensor], make_cache: Callable[[], Cache], chunk: int = 128) -> PerplexityResult:
    """Perplexity over several windows, each through a fresh cache from ``make_cache``."""
    return sum((window_nll(model, ids, make_cache(), chunk) for ids in windows), PerplexityResult(0.0, 0))


@torch.no_grad()
def continuation_nll(model, ids: torch.Tensor, past_keys: list[torch.Tensor], past_values: list[torch.Tensor]) -> PerplexityResult:
    """Summed NLL of the ``T - 1`` tokens of ``ids`` [1, T] predicted from inside it, read in one pass against a plain
    DynamicCache holding the given past (per-layer K/V [1, H, P, d], e.g. a prefix restored from a KV store): the
    reuse case, where the past was computed once and stored, and a later request continues from it."""
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(past_keys, past_values)):
        cache.update(k.float(), v.float(), i)
    device = next(model.parameters()).device
    ids = ids.to(device)
    logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, :-1].float()
    return PerplexityResult(F.cross_entropy(logits, ids[0, 1:], reduction="sum").item(), ids.shape[-1] - 1)
