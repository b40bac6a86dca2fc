"""The auto-tuner's mechanics on a tiny model: ladders, reallocation, and a search that verifies by measurement."""

from __future__ import annotations

import pytest
import torch

from kvhub.codec import STREAMS, ModelShape
from kvhub.tuning import LEVELS, reallocate, search, stream_ladders
from tests.tiny_models import VOCAB, tiny_bases, tiny_model


@pytest.mark.parametrize("quantizer", ["uniform", "lloyd-max"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_ladders_are_valid_and_ordered_by_bits(head_dim, quantizer):
    ladders = stream_ladders(head_dim, quantizer)
    for name in STREAMS:
        bits = [lay.bits_per_token() for lay in ladders[name]]
        assert bits == sorted(bits) and len(set(bits)) == len(bits)
        for lay in ladders[name]:
            lay.check(name, head_dim)
            assert lay.rank == head_dim  # no rank cuts
    level_bits = [ladders["keys"][k].bits_per_token() + ladders["values"][v].bits_per_token() for k, v in LEVELS]
    assert level_bits == sorted(level_bits) and len(set(LEVELS)) == len(LEVELS)
    # the chosen levels on every values layout but the one with an 8-bit segment (no Lloyd-Max table for 8 bits)
    assert [v.quantizer for v in ladders["values"]] == [quantizer] * (len(ladders["values"]) - 1) + ["uniform"]
    assert all(k.quantizer == "uniform" for k in ladders["keys"])


def test_reallocation_moves_least_sensitive_down_and_most_sensitive_up():
    ladders = stream_ladders(16)
    rungs = {(i, s): 2 for i in range(6) for s in STREAMS}
    sens = {(i, s): float(i) for i in range(6) for s in STREAMS}  # layer 0 least sensitive, layer 5 most
    moved = reallocate(rungs, sens, ladders)
    for s in STREAMS:
        assert moved[(0, s)] == 1 and moved[(1, s)] == 1 and moved[(5, s)] == 3
        assert all(moved[(i, s)] == 2 for i in (2, 3, 4))


def test_search_returns_a_measured_codec_within_target():
    model = tiny_model("llama")
    bases = tiny_bases(model)
    gen = torch.Generator().manual_seed(9)
    windows = [torch.randint(3, VOCAB, (1, 96), generator=gen) for _ in range(2)]
    logs: list[str] = []
    result = search(model, bases, windows, target_delta=0.05, sink=2, windows=(0,), flush_block=4, log=logs.append)
    assert result.trials and all(t.measured_delta_pct is not None for t in result.trials)
    passing = [t for t in result.trials if t.measured_delta_pct <= 5.0]
    if passing:  # the choice is the most compressed trial that measured within target
        assert result.chosen.ratio == max(t.ratio for t in passing)
    assert any(line.startswith("chose ") for line in logs)
    result.codec.check(ModelShape.from_config(model.config))
