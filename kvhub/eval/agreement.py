"""Greedy-continuation agreement with the uncompressed cache: after the same prompt, how many of the tokens a
compressed cache generates greedily equal DynamicCache's, counted from the first (leading) and position by position.
Perplexity averages over every token; this shows whether the text a user reads changes.

A free-running continuation is chaotic: where two tokens are nearly tied (logits 0.01 apart), the last bits of the
arithmetic pick one, and everything after follows that pick. ``forced_equal`` counts instead, at every position of
DynamicCache's continuation and fed its tokens (teacher forcing), whether the compressed cache's top token is the same:
a near tie then costs one position, not the rest of the text."""

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
    forced_equal: int  # top-1 equal at each position of the reference continuation, fed its tokens


def _prefill(model, ids: torch.Tensor, cache: Cache, chunk: int) -> None:
    """All but the last prompt token through ``cache`` in ``chunk``-token pieces (so the prompt is read from the
    compressed past, as in decoding)."""
    for start in range(0, ids.shape[1] - 1, chunk):
        model(input_ids=ids[:, start : min(start + chunk, ids.shape[1] - 1)], cache=cache, use_cache=True)


@torch.no_grad()
def continue_greedy(model, ids: torch.Tensor, cache: Cache, new_tokens: int, chunk: int = 128) -> torch.Tensor:
    """Prefill (:func:`_prefill`), then generate ``new_tokens`` greedily; returns the new tokens of row 0."""
    _prefill(model, ids, cache, chunk)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new_tokens,
                         do_sample=False)
    return out[0, ids.shape[1]:]


@torch.no_grad()
def forced_top1(model, ids: torch.Tensor, cache: Cache, reference: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Prefill (:func:`_prefill`), then at each position of ``reference`` (a continuation of ``ids``) the cache's top
    token, with the reference's own tokens fed in (teacher forcing)."""
    _prefill(model, ids, cache, chunk)
    tokens, top = ids[:, -1:], []
    for token in reference:
        top.append(model(input_ids=tokens, cache=cache, use_cache=True).logits[0, -1].argmax())
        tokens = token.view(1, 1).to(ids.device)
    return torch.stack(top)


def greedy_agreement(model, ids: torch.Tensor, make_cache: Callable[[], Cache], new_tokens: int = 32,
                     chunk: int = 128, baseline: Callable[[], Cache] | None = None) -> Agreement:
    """Agreement of the greedy continuation of ``ids`` through caches from ``make_cache`` with ``baseline``'s
    (default: DynamicCache), free-running and teacher-forced (two caches: each run needs a fresh one)."""
    ref = continue_greedy(model, ids, (baseline or (lambda: DynamicCache(config=model.config)))(), new_tokens, chunk)
    out = continue_greedy(model, ids, make_cache(), new_tokens, chunk)
    n = min(len(ref), len(out))
    same = ref[:n] == out[:n]
    forced = forced_top1(model, ids, make_cache(), ref, chunk) == ref
    return Agreement(int(same.cumprod(0).sum()), int(same.sum()), n, int(forced.sum()))
