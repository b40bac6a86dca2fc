"""What `kvhub demo` says about its numbers, and the break-even context length it (and the README) quote."""

from __future__ import annotations

import json

import torch

from kvhub.cli.demo import explain
from kvhub.footprint import Footprint
from kvhub.preset import KVPreset
from tests.paths import ROOT
from tests.test_registry import eval_text, measured_preset, model_dir  # noqa: F401  (session fixtures)


def test_break_even_is_where_the_bases_are_paid_for():
    row = next(r for r in json.loads((ROOT / "benchmarks/results/bytes.json").read_text())["rows"] if r["batch"] == 1)
    f = Footprint(row["tokens"], 1, row["fp16"], row["per_sequence"], row["shared_bases"], None)
    bytes_at = lambda tokens: (tokens * f.fp16 / f.tokens, tokens * f.per_sequence / f.tokens + f.shared_bases)  # noqa: E731
    for batch in (1, 4):
        n = f.break_even_tokens(batch)
        fp16, kvhub = bytes_at(n * batch)
        below_fp16, below_kvhub = bytes_at((n - 1) * batch)
        assert fp16 >= kvhub and below_fp16 < below_kvhub  # the first length at which the cache pays


def test_demo_explains_agreement_ratio_and_break_even(measured_preset, tiny_llama):  # noqa: F811
    preset = KVPreset.load_folder(measured_preset)
    cache = preset.build_cache(tiny_llama)
    with torch.no_grad():
        tiny_llama(input_ids=torch.randint(3, 60, (1, 40)), cache=cache, use_cache=True)
    lines = explain(preset, cache, 3, 8)
    assert lines[0].startswith("agreement: the first 3 of 8 generated tokens are identical. Expected to part")
    assert f"{cache.compression_ratio():.2f}x smaller" in lines[1]
    measured = Footprint.of_metrics(preset.metrics, cache.bases_nbytes())
    assert lines[2].startswith(f"why {cache.compression_ratio():.2f}x and not the {measured.ratio:.2f}x measured at "
                               f"{measured.tokens} tokens: the first {preset.codec.layers[0].sink} tokens")
    assert "at 40 tokens they are a larger share" in lines[2]
    assert "where it pays:" in lines[3] and "tokens of context at batch 1" in lines[3]
