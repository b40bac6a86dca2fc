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


def test_each_corpus_reports_its_worst_and_standard_error_and_a_rerun_is_identical(tiny_preset, tiny, eval_text,
                                                                                   tmp_path):  # noqa: F811
    """Per-corpus standard error over windows, from per-window NLLs recomputed here through fresh caches; the worst
    corpus is the largest delta; the same run twice on the same machine gives the same numbers to the last bit."""
    import math
    import statistics

    from kvhub import KVPreset
    from kvhub.eval import EvalConfig, evaluate, metrics_block
    from kvhub.eval.ppl import window_nll
    from kvhub.text import token_windows

    model, tok = tiny
    preset = KVPreset.from_pretrained(str(tiny_preset))
    text = eval_text.read_text()
    other = tmp_path / "reversed_paragraphs.txt"  # a second corpus of other text from the same words
    other.write_text("\n\n".join(reversed(text.split("\n\n"))))
    cfg = EvalConfig([str(eval_text), str(other)], windows=3, window_tokens=64, chunk=16, progress=False)
    make = lambda: preset.build_cache(model, allow_name_mismatch=True)  # noqa: E731
    first, second = evaluate(model, tok, make, cfg), evaluate(model, tok, make, cfg)
    assert first.ppl == second.ppl

    for name, path in ((eval_text.stem, eval_text), (other.stem, other)):
        deltas = []
        for ids in token_windows(tok, path.read_text(), 64, 3):
            base = window_nll(model, ids, DynamicCache(config=model.config), 16)
            comp = window_nll(model, ids, make(), 16)
            deltas.append(100 * (math.exp((comp.nll_sum - base.nll_sum) / base.tokens) - 1))
        assert len(deltas) == 3 and len(set(deltas)) > 1
        assert first.ppl[name]["delta_pct_se"] == pytest.approx(statistics.stdev(deltas) / math.sqrt(3), rel=1e-9)
    worst = max(first.ppl, key=lambda n: first.ppl[n]["delta_pct"])
    ppl = metrics_block(first, cfg)["perplexity"]
    assert ppl["worst_corpus"] == worst and ppl["worst_delta_pct"] == round(first.ppl[worst]["delta_pct"], 4)
    assert ppl["worst_delta_pct"] >= ppl["mean_delta_pct"]
