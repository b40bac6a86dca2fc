"""The auto-tuner's mechanics on a tiny model: ladders, reallocation, and a search that verifies by measurement."""

from __future__ import annotations

import pytest
import torch

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvhub.cache import CompressedCache
from kvhub.codec import STREAMS, ModelShape
from kvhub.eval.ppl import perplexity
from kvhub.tuning import LEVELS, reallocate, search, stream_ladders
from tests.tiny_models import VOCAB, tiny_bases


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


TARGET = 0.0005  # +0.05%: on this model the ladder's top level passes and the lower ones do not (a split)


@pytest.fixture(scope="module")
def searched():
    """A search on a 2-layer random Llama with head_dim 64 (the ladders of a 16-dim head are too coarse to order by
    bytes) over probe windows longer than a perplexity chunk, so tokens do attend to a compressed past."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, vocab_size=VOCAB, hidden_size=128, intermediate_size=128,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    bases = tiny_bases(model)
    gen = torch.Generator().manual_seed(9)
    windows = [torch.randint(3, VOCAB, (1, 320), generator=gen) for _ in range(2)]
    logs: list[str] = []
    result = search(model, bases, windows, target_delta=TARGET, sink=2, windows=(0,), flush_block=4, log=logs.append)
    return model, bases, windows, result, logs


def test_search_chooses_the_most_compressed_trial_within_target(searched):
    model, _, _, result, logs = searched
    passing = [t for t in result.trials if t.measured_delta_pct <= 100 * TARGET]
    failing = [t for t in result.trials if t.measured_delta_pct > 100 * TARGET]
    assert passing and failing, "the target must split the ladder for this test to mean anything"
    assert result.chosen in passing and result.chosen.ratio == max(t.ratio for t in passing)
    assert result.codec == result.chosen.codec
    assert any(line.startswith("chose ") for line in logs)
    result.codec.check(ModelShape.from_config(model.config))


def test_chosen_codec_re_measures_within_target(searched):
    """A fresh cache from the returned codec, measured again on the same probe windows against DynamicCache."""
    model, bases, windows, result, _ = searched
    shape = ModelShape.from_config(model.config)
    caches: list[CompressedCache] = []

    def make() -> CompressedCache:
        caches.append(CompressedCache(model.config, result.codec, bases.rotated_for(result.codec, shape)))
        return caches[-1]

    base = perplexity(model, windows, lambda: DynamicCache(config=model.config)).ppl
    delta_pct = 100 * (perplexity(model, windows, make).ppl / base - 1)
    assert delta_pct <= 100 * TARGET
    assert delta_pct == pytest.approx(result.chosen.measured_delta_pct, abs=1e-6)
    assert caches[-1].compression_ratio() == pytest.approx(result.chosen.ratio)


def test_bytes_fall_along_the_ladder(searched):
    """Uniform levels are ordered from fewest to most bits: a lower level holds fewer bytes (a higher ratio)."""
    _, _, _, result, _ = searched
    uniform = sorted((int(t.name.rsplit(" ", 1)[1]), t.ratio) for t in result.trials if t.name.startswith("uniform"))
    assert len(uniform) >= 3
    ratios = [ratio for _, ratio in uniform]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == len(ratios)
