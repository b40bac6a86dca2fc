"""Needle-in-a-haystack passkey retrieval (protocol of docs/field.md).

A 5-digit pass key is hidden at a given depth of a Persuasion haystack; the question and the assistant prefix
"The pass key is" follow in the chat template (SmolLM2 writes digits one token each and fails without the prefix).
The prompt, exactly ``context`` tokens long, is prefilled through the cache in 512-token chunks, so retrieval reads
what the cache stored; then up to 8 tokens are generated greedily. A hit is the first 5-digit number equal to the key.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from ..attention import compressed_attention

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the 5-digit number only."
ANSWER_PREFIX = "The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
CONTEXTS = (1024, 2048, 4096)


@dataclass
class NeedleGrid:
    context_lengths: list[int]
    depths: list[float]
    hits: list[list[int]] = field(default_factory=list)  # [context][depth] 0/1
    answers: list[list[str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        cells = [h for row in self.hits for h in row]
        return sum(cells) / len(cells) if cells else 0.0

    def row_summary(self) -> str:
        return " / ".join(f"{sum(row)}/{len(row)}" for row in self.hits)


def passkey(context: int, depth: float) -> str:
    """A deterministic key per cell, so every method is asked the same questions."""
    return str(random.Random(f"{context}-{depth}").randint(10000, 99999))


def _parts(tokenizer, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of what surrounds the haystack: the chat template's head (the same for every cell), its tail (the
    question and the answer prefix) and the needle sentence."""
    marker = "\x00HAY\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{marker}\n\n{QUESTION}"}], tokenize=False,
                                         add_generation_prompt=True) + ANSWER_PREFIX
    head, tail = text.split(marker)
    enc = lambda s: tokenizer(s, add_special_tokens=False, return_tensors="pt")["input_ids"][0]  # noqa: E731
    return enc(head), enc(tail), enc(" " + NEEDLE.format(key=key) + " ")


def build_prompt(tokenizer, haystack_ids: torch.Tensor, context: int, depth: float, key: str) -> torch.Tensor:
    """Token ids of exactly ``context`` tokens: chat template around haystack + needle + question, then the prefix.
    Up to the needle, every prompt is the same stream: the head, then the haystack from its start."""
    head_ids, tail_ids, needle_ids = _parts(tokenizer, key)
    budget = context - len(head_ids) - len(tail_ids) - len(needle_ids)
    if budget <= 0 or budget > haystack_ids.numel():
        raise ValueError(f"cannot build a {context}-token prompt from a {haystack_ids.numel()}-token haystack")
    cut = int(budget * depth)
    ids = torch.cat([head_ids, haystack_ids[:cut], needle_ids, haystack_ids[cut:budget], tail_ids])
    assert ids.numel() == context
    return ids.unsqueeze(0)


@torch.no_grad()
def ask(model, tokenizer, ids: torch.Tensor, cache: Cache, prefill_chunk: int = 512, max_new_tokens: int = 8,
        start: int = 0) -> str:
    """Prefill ``ids`` but its last token through ``cache`` in ``prefill_chunk``-token chunks, then generate. A cache
    already holding the first ``start`` tokens (a multiple of ``prefill_chunk``) continues from there."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    with compressed_attention(model):
        for begin in range(start, ids.shape[1] - 1, prefill_chunk):  # all but the last token go through the cache
            model(input_ids=ids[:, begin : min(begin + prefill_chunk, ids.shape[1] - 1)], cache=cache, use_cache=True)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def shared_prefix(ids: torch.Tensor, stream: torch.Tensor, chunk: int) -> int:
    """How many leading tokens of ``ids`` [1, T] a cache filled from ``stream`` may stand for: the longest whole
    number of ``chunk``-token prefill chunks that equal the stream and come before the last token (which ``ask``
    always feeds to ``generate``). Whole chunks, so every forward pass is the one a fresh prefill would run."""
    n = min(ids.shape[1] - 1, stream.numel())
    differ = (ids[0, :n] != stream[:n].to(ids.device)).nonzero()
    same = int(differ[0]) if differ.numel() else n
    return same // chunk * chunk


def needle_grid(
    model,
    tokenizer,
    haystack_text: str,
    make_cache: Callable[[], Cache],
    contexts: tuple[int, ...] = CONTEXTS,
    depths: tuple[float, ...] = DEPTHS,
    progress: Callable[[], None] | None = None,
    prefill_chunk: int = 512,
) -> NeedleGrid:
    """Every (context, depth) cell, each through a fresh cache from ``make_cache``.

    With a ``DynamicCache`` (exact, so a copy continues exactly as the original would), the haystack is prefilled
    once: every prompt starts with the same head and haystack up to its needle, so each cell starts from a copy of
    that shared prefix, cut at a whole prefill chunk, and runs only the rest (the same forward passes as a fresh
    prefill, so the same answers). A compressed cache runs every prompt from the start."""
    haystack = tokenizer(haystack_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    prompts = {(i, j): build_prompt(tokenizer, haystack, c, d, passkey(c, d))
               for i, c in enumerate(contexts) for j, d in enumerate(depths)}
    stream = torch.cat([_parts(tokenizer, "0")[0], haystack])
    chain = make_cache()
    shared = isinstance(chain, DynamicCache)
    starts = {cell: shared_prefix(ids, stream, prefill_chunk) if shared else 0 for cell, ids in prompts.items()}
    device = next(model.parameters()).device
    filled = 0
    grid = NeedleGrid(list(contexts), list(depths), [[0] * len(depths) for _ in contexts],
                      [[""] * len(depths) for _ in contexts])
    for (i, j), ids in sorted(prompts.items(), key=lambda item: starts[item[0]]):
        start = starts[(i, j)]
        with torch.no_grad(), compressed_attention(model):
            while filled < start:  # extend the shared prefix, one prefill chunk at a time
                model(input_ids=stream[filled : filled + prefill_chunk].unsqueeze(0).to(device), cache=chain,
                      use_cache=True)
                filled += prefill_chunk
        key = passkey(contexts[i], depths[j])
        answer = ask(model, tokenizer, ids, copy.deepcopy(chain) if start else make_cache(), prefill_chunk, start=start)
        found = re.search(r"\d{5}", answer.replace(" ", ""))
        grid.hits[i][j] = int(bool(found) and found.group(0) == key)
        grid.answers[i][j] = answer.strip()
        if progress:
            progress()
    return grid
