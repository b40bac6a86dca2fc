"""Greedy-continuation agreement with the uncompressed cache: after the same prompt, how many of the tokens a
compressed cache generates greedily equal DynamicCache's, counted from the first (leading) and position by position.
Perplexity averages over every token; this shows whether the text a user reads changes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache


@dataclass(frozen=True)
class Agreement:
    leading_equal: int
    positions_equal: int
    generated: int


@torch.no_grad()
def continue_greedy(model, ids: torch.Tensor, cache: Cache, new_tokens: int, chunk: int = 128) -> torch.Tensor:
    """Prefill all but the last prompt token through ``cache`` in ``chunk``-token pieces (so the prompt is read from
    the compressed past, as in decoding), then generate ``new_tokens`` greedily; returns the new tokens of row 0."""
    for start in range(0, ids.shape[1] - 1, chunk):
        model(input_ids=ids[:, start : min(start + chunk, ids.shape[1] - 1)], cache=cache, use_cache=True)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new_tokens,
                         do_sample=False)
    return out[0, ids.shape[1]:]


def greedy_agreement(model, ids: torch.Tensor, cache: Cache, new_tokens: int = 32, chunk: int = 128,
                     baseline: Callable[[], Cache] | None = None) -> Agreement:
    """Agreement of ``cache``'s greedy continuation of ``ids`` with ``baseline``'s (default: DynamicCache)."""
    ref = continue_greedy(model, ids, (baseline or (lambda: DynamicCache(config=model.config)))(), new_tokens, chunk)
    out = continue_greedy(model, ids, cache, new_tokens, chunk)
    n = min(len(ref), len(out))
    same = ref[:n] == out[:n]
    return Agreement(int(same.cumprod(0).sum()), int(same.sum()), n)
