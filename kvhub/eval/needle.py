"""Needle-in-a-haystack passkey retrieval (protocol of docs/field.md).

A 5-digit pass key is hidden at a given depth of a Persuasion haystack; the question and the assistant prefix
"The pass key is" follow in the chat template (SmolLM2 writes digits one token each and fails without the prefix).
The prompt, exactly ``context`` tokens long, is prefilled through the cache in 512-token chunks, so retrieval reads
what the cache stored; then up to 8 tokens are generated greedily. A hit is the first 5-digit number equal to the key.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
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


def build_prompt(tokenizer, haystack_ids: torch.Tensor, context: int, depth: float, key: str) -> torch.Tensor:
    """Token ids of exactly ``context`` tokens: chat template around haystack + needle + question, then the prefix."""
    marker = "\x00HAY\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{marker}\n\n{QUESTION}"}], tokenize=False,
                                         add_generation_prompt=True) + ANSWER_PREFIX
    head, tail = text.split(marker)
    enc = lambda s: tokenizer(s, add_special_tokens=False, return_tensors="pt")["input_ids"][0]  # noqa: E731
    head_ids, tail_ids, needle_ids = enc(head), enc(tail), enc(" " + NEEDLE.format(key=key) + " ")
    budget = context - len(head_ids) - len(tail_ids) - len(needle_ids)
    if budget <= 0 or budget > haystack_ids.numel():
        raise ValueError(f"cannot build a {context}-token prompt from a {haystack_ids.numel()}-token haystack")
    cut = int(budget * depth)
    ids = torch.cat([head_ids, haystack_ids[:cut], needle_ids, haystack_ids[cut:budget], tail_ids])
    assert ids.numel() == context
    return ids.unsqueeze(0)


@torch.no_grad()
def ask(model, tokenizer, ids: torch.Tensor, cache: Cache, prefill_chunk: int = 512, max_new_tokens: int = 8) -> str:
    device = next(model.parameters()).device
    ids = ids.to(device)
    with compressed_attention(model):
        for start in range(0, ids.shape[1] - 1, prefill_chunk):  # all but the last token go through the cache
            model(input_ids=ids[:, start : min(start + prefill_chunk, ids.shape[1] - 1)], cache=cache, use_cache=True)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def needle_grid(
    model,
    tokenizer,
    haystack_text: str,
    make_cache: Callable[[], Cache],
    contexts: tuple[int, ...] = CONTEXTS,
    depths: tuple[float, ...] = DEPTHS,
    progress: Callable[[], None] | None = None,
) -> NeedleGrid:
    haystack = tokenizer(haystack_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    grid = NeedleGrid(list(contexts), list(depths))
    for context in contexts:
        hits, answers = [], []
        for depth in depths:
            key = passkey(context, depth)
            answer = ask(model, tokenizer, build_prompt(tokenizer, haystack, context, depth, key), make_cache())
            found = re.search(r"\d{5}", answer.replace(" ", ""))
            hits.append(int(bool(found) and found.group(0) == key))
            answers.append(answer.strip())
            if progress:
                progress()
        grid.hits.append(hits)
        grid.answers.append(answers)
    return grid
