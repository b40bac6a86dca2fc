"""Attention computed from the compressed storage equals attention over the rebuilt K/V."""

from __future__ import annotations

import pytest
import torch

from kvhub import CacheCodec, CompressedCache, ModelShape
from kvhub.attention import compressed_attention, is_compressed_attention
from kvhub.codec import LayerCodec, Segment, StreamCodec
from kvhub.layer import CompressedLayer
from tests.tiny_models import ARCHS, VOCAB, tiny_bases, tiny_model

TOL = 1e-4  # fp32; both paths dequantize the same codes, only the summation order differs


def mixed_codec(shape: ModelShape, scale: str) -> CacheCodec:
    """Every segment kind at once: 8/4/2 bits, 16-bit passthrough, a dropped tail."""
    keys = StreamCodec((Segment(4, 16), Segment(4, 8), Segment(8, 4)), "pca", "token")
    values = StreamCodec((Segment(8, 4), Segment(4, 2), Segment(4, 0)), "pca", scale)
    return CacheCodec(tuple(LayerCodec(keys, values, sink=2, window=4) for _ in range(shape.num_layers)), flush_block=4)


def run(model, cache_factory, ids, mask=None, prefill=30):
    cache = cache_factory()
    outs = []
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": mask[:, :prefill]}
        outs.append(model(input_ids=ids[:, :prefill], cache=cache, use_cache=True, **kw).logits)
        for t in range(prefill, ids.shape[1]):
            kw = {} if mask is None else {"attention_mask": mask[:, : t + 1]}
            outs.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True, **kw).logits)
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("scale", ["rms", "channel"])
def test_compressed_attention_matches_materialized(arch, scale):
    model = tiny_model(arch)
    shape = ModelShape.from_config(model.config)
    codec = mixed_codec(shape, scale)
    bases = tiny_bases(model).rotated_for(codec, shape)
    ids = torch.randint(3, VOCAB, (2, 62), generator=torch.Generator().manual_seed(1))
    make = lambda: CompressedCache(model.config, codec, bases)  # noqa: E731
    ref, _ = run(model, make, ids)  # the reference: rebuilt K/V, the model's own (eager) attention
    with compressed_attention(model):
        got, cache = run(model, make, ids)
    assert (ref - got).abs().max().item() <= TOL
    layers = [layer for layer in cache.layers if isinstance(layer, CompressedLayer)]
    # every layer, sliding ones included (Mistral: all of them), decoded from the codes
    assert len(layers) == len(cache.layers) and all(layer.visible > 0 for layer in layers)
    if arch != "llama":  # sliding layers forgot what left their window and still matched
        assert any(layer.is_sliding and layer.dropped > 0 for layer in layers)


def test_compressed_attention_with_left_padding():
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    codec = mixed_codec(shape, "rms")
    bases = tiny_bases(model).rotated_for(codec, shape)
    ids = torch.randint(3, VOCAB, (2, 50), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    make = lambda: CompressedCache(model.config, codec, bases)  # noqa: E731
    ref, _ = run(model, make, ids, mask)  # the reference: rebuilt K/V, the model's own attention
    with compressed_attention(model):
        got, _ = run(model, make, ids, mask)
    assert (ref[mask.bool()] - got[mask.bool()]).abs().max().item() <= TOL


def test_cache_returns_only_exact_tokens_when_attention_reads_codes():
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    codec = mixed_codec(shape, "rms")
    cache = CompressedCache(model.config, codec, tiny_bases(model).rotated_for(codec, shape))
    k = torch.randn(1, 2, 40, 16)
    with compressed_attention(model):
        assert is_compressed_attention(model.config._attn_implementation)
        keys, _ = cache.update(k, k, 0)
        assert keys is k  # a prefill with nothing compressed yet: the model's own kernel gets the states untouched
        keys, _ = cache.update(k[:, :, :1], k[:, :, :1], 0)
    assert model.config._attn_implementation == "eager"  # restored on exit
    layer = cache.layers[0]
    assert keys.shape[-2] == 2 + layer.recent_keys.shape[-2] and keys._kvhub_layer is layer
    assert layer.visible == layer.streams["keys"].length == 40 - 2 - 4
