"""`kvhub eval`'s cost: what a run says it will do, --quick, and the needle grid's shared prefill (same answers)."""

from __future__ import annotations

import pytest
from transformers import DynamicCache

from kvhub.eval.needle import ask, build_prompt, needle_grid, passkey, shared_prefix
from kvhub.models import load_model
from tests.test_registry import eval_text, model_dir  # noqa: F401  (session fixtures: the tiny model on disk)

CONTEXTS, DEPTHS, CHUNK = (96, 160), (0.1, 0.9), 32


@pytest.fixture(scope="module")
def tiny(model_dir):  # noqa: F811
    return load_model(str(model_dir))


def test_shared_prefill_gives_the_answers_of_a_fresh_prefill(tiny, eval_text, monkeypatch):  # noqa: F811
    """The baseline grid prefills the haystack once and starts each cell from a copy cut at a whole chunk: every
    answer is the one a fresh DynamicCache gives, and some cells do start past their first chunks."""
    import kvhub.eval.needle as needle

    model, tok = tiny
    hay = eval_text.read_text()
    starts = []

    def recording_ask(*args, start=0, **kwargs):
        starts.append(start)
        return ask(*args, start=start, **kwargs)

    monkeypatch.setattr(needle, "ask", recording_ask)
    grid = needle_grid(model, tok, hay, lambda: DynamicCache(config=model.config), CONTEXTS, DEPTHS, prefill_chunk=CHUNK)
    haystack = tok(hay, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    for i, context in enumerate(CONTEXTS):
        for j, depth in enumerate(DEPTHS):
            ids = build_prompt(tok, haystack, context, depth, passkey(context, depth))
            assert grid.answers[i][j] == ask(model, tok, ids, DynamicCache(config=model.config), CHUNK).strip()
    assert len(starts) == len(CONTEXTS) * len(DEPTHS) and max(starts) >= 2 * CHUNK and min(starts) == 0


def test_shared_prefix_stops_at_the_needle_and_before_the_last_token():
    import torch

    stream = torch.arange(100)
    ids = torch.cat([torch.arange(70), torch.tensor([999]), torch.arange(70, 90)]).unsqueeze(0)
    assert shared_prefix(ids, stream, 32) == 64 and shared_prefix(ids, stream, 16) == 64
    assert shared_prefix(stream[:65].unsqueeze(0), stream, 32) == 64  # 64 tokens, the last one (64) still to go
    assert shared_prefix(stream[:64].unsqueeze(0), stream, 32) == 32


def test_eval_says_what_it_will_cost_and_quick_is_a_fraction(tiny_preset, model_dir, eval_text, capsys):  # noqa: F811
    from kvhub.cli import main
    from kvhub.eval import QUICK, EvalConfig

    full = EvalConfig([str(eval_text)], needle=True).work(3)
    assert full == {"ppl_windows": 9, "ppl_tokens": 36864, "needle_cells": 15, "needle_tokens": 71680}
    quick = EvalConfig([str(eval_text)], needle=True, **QUICK).work(3)
    assert quick["ppl_tokens"] + quick["needle_tokens"] <= (full["ppl_tokens"] + full["needle_tokens"]) / 8

    args = ["eval", str(tiny_preset), "--model", str(model_dir), "--ppl", str(eval_text), "--chunk", "16", "--needle",
            "--haystack", str(eval_text)]
    assert main([*args, "--window-tokens", "64", "--context-lengths", "96"]) == 0
    err = capsys.readouterr().err
    assert ("this run: perplexity on 1 file(s) x 3 window(s) x 64 tokens, each through DynamicCache and the preset "
            "(384 tokens); needle grid 1 length(s) x 5 depth(s), each through both (10 prompts, up to 960 tokens)") in err
    assert "the first window through both caches took" in err and "at that pace the whole run takes about" in err

    # --quick: its windows and needle cells, except what is given explicitly (a haystack this short has no 1k cell)
    assert main([*args, "--quick", "--window-tokens", "64", "--context-lengths", "96"]) == 0
    captured = capsys.readouterr()
    assert "1 file(s) x 1 window(s) x 64 tokens" in captured.err and "1 length(s) x 3 depth(s)" in captured.err
    [row] = [line for line in captured.out.splitlines() if line.startswith("needle ")]
    assert row.startswith("needle    96: ") and row.count("/3)") == 2  # 3 cells, preset and baseline
