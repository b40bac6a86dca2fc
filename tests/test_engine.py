"""Mechanics of CompressedCache on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvhub import CacheCodec, CodecError, CompressedCache, ModelShape
from kvhub.bases import Bases, StreamBasis
from kvhub.codec import LayerCodec, Segment, StreamCodec
from kvhub.layer import CompressedLayer
from kvhub.quant import pack, unpack
from tests.tiny_models import ARCHS, VOCAB, tiny_bases, tiny_model

EXACT = 1e-4


def lossless(model, sink=2, window=4, flush_block=4):
    """r = d, 16-bit segments stored as fp32 (``exact_dtype``): the whole machinery with no rounding."""
    shape = ModelShape.from_config(model.config)
    codec = CacheCodec.uniform(shape, 16, 16, sink=sink, window=window)
    return CacheCodec(codec.layers, flush_block=flush_block)


def forward_loop(model, ids, cache, prefill=40):
    outs = []
    with torch.no_grad():
        outs.append(model(input_ids=ids[:, :prefill], cache=cache, use_cache=True).logits)
        for t in range(prefill, ids.shape[1]):
            outs.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lossless_codec_matches_dynamic_cache(arch):
    model = tiny_model(arch)
    bases = tiny_bases(model)
    ids = torch.randint(3, VOCAB, (1, 72), generator=torch.Generator().manual_seed(5))  # prefill 40 + 32 decode steps
    ref = forward_loop(model, ids, DynamicCache(config=model.config))
    cache = CompressedCache(model.config, lossless(model), bases, torch.float32)
    got = forward_loop(model, ids, cache)
    assert (ref - got).abs().max().item() <= EXACT
    assert cache.compressed_layers == list(range(model.config.num_hidden_layers))
    if arch != "llama":  # sliding layers forgot what left their window, exactly like the stock layer
        sliding = [layer for layer in cache.layers if layer.is_sliding]
        assert sliding and all(layer.held_tokens() < 72 for layer in sliding)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_generate_both_spellings_and_greedy_agreement(arch):
    model = tiny_model(arch)
    bases = tiny_bases(model)
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    new = model.generate(ids, max_new_tokens=12, do_sample=False, cache=CompressedCache(model.config, lossless(model), bases, torch.float32))
    assert torch.equal(ref, new)
    with pytest.warns(FutureWarning):
        old = model.generate(ids, max_new_tokens=12, do_sample=False,
                             past_key_values=CompressedCache(model.config, lossless(model), bases, torch.float32))
    assert torch.equal(ref, old)


def test_left_padded_batch_equals_separate_runs():
    model = tiny_model("llama")
    bases = tiny_bases(model)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, VOCAB, (1, 20), generator=gen), torch.randint(3, VOCAB, (1, 13), generator=gen)
    singles = [
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                       cache=CompressedCache(model.config, lossless(model), bases, torch.float32))[0, x.shape[1]:]
        for x in (a, b)
    ]
    pad = torch.zeros((1, 7), dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([torch.ones(1, 20), torch.cat([torch.zeros(1, 7), torch.ones(1, 13)], 1)]).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         cache=CompressedCache(model.config, lossless(model), bases, torch.float32))
    assert torch.equal(out[0, 20:], singles[0]) and torch.equal(out[1, 20:], singles[1])


def test_beam_search_matches_dynamic_cache():
    model = tiny_model("llama")
    bases = tiny_bases(model)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=False, attention_mask=torch.ones_like(ids))
    ref = model.generate(ids, **kw)
    new = model.generate(ids, cache=CompressedCache(model.config, lossless(model), bases, torch.float32), **kw)
    assert torch.equal(ref, new)


def test_sampling_with_quantized_cache_runs():
    model = tiny_model("qwen2-mixed")
    bases = tiny_bases(model)
    codec = CacheCodec.uniform(ModelShape.from_config(model.config), 4, 2, key_rank=12, value_rank=8)
    torch.manual_seed(0)
    out = model.generate(torch.randint(3, VOCAB, (2, 12)), attention_mask=torch.ones(2, 12, dtype=torch.long),
                         max_new_tokens=20, do_sample=True, top_k=20, cache=CompressedCache(model.config, codec, bases))
    assert out.shape == (2, 32)


def storage_bytes(root) -> dict[int, int]:
    """Every tensor storage reachable from ``root`` (through attributes of kvhub/transformers objects, dicts, lists,
    tuples), de-duplicated by data pointer: pointer -> bytes of the whole storage, however little a view shows.
    An independent count: it knows nothing of how the cache sums its bytes."""
    found, seen, stack = {}, set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack += list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack += list(obj)
        elif type(obj).__module__.startswith(("kvhub", "transformers")) and hasattr(obj, "__dict__"):
            stack += list(vars(obj).values())
    return found


def spec_bytes(cache: CompressedCache) -> int:
    """Bytes the codec's description says the held tokens take: per token and KV head, each kept segment's bits
    (16-bit segments as fp16), one fp16 scale per quantized segment, and head_dim fp16 values per exact (sink or
    recent) token. Token counts are read off the layers; the byte arithmetic is the codec's, not the cache's."""
    total = 0
    for layer in cache.layers:
        batch, heads, _, head_dim = layer.sink_keys.shape
        for name, stream in layer.streams.items():
            codec = getattr(layer.codec, name)
            per_token = sum(s.size * s.bits // 8 for s in codec.segments if s.bits)
            per_token += 2 * sum(1 for s in codec.segments if 0 < s.bits < 16)
            exact = layer.sink_keys.shape[2] + layer.recent_keys.shape[2]
            total += batch * heads * (stream.length * per_token + exact * head_dim * 2)
    return total


@pytest.mark.parametrize("batch", [1, 3])
def test_nbytes_is_what_the_codec_says_and_shrinks_with_bits(batch):
    model = tiny_model("llama")
    bases = tiny_bases(model)
    shape = ModelShape.from_config(model.config)
    ids = torch.randint(3, VOCAB, (batch, 200), generator=torch.Generator().manual_seed(6))
    totals = {}
    for bits in (2, 4, 8):
        cache = CompressedCache(model.config, CacheCodec.uniform(shape, bits, bits, key_rank=12, value_rank=12), bases)
        forward_loop(model, ids, cache, prefill=190)
        n = cache.nbytes()
        assert n["total"] == spec_bytes(cache) == n["codes"] + n["scales"] + n["full_precision"]
        assert cache.fp16_nbytes() == batch * 200 * 2 * 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim
        assert cache.compression_ratio() == pytest.approx(cache.fp16_nbytes() / n["total"])
        totals[bits] = n["total"]
    assert totals[2] < totals[4] < totals[8]


def filled_cache(batch: int = 1) -> CompressedCache:
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    cache = CompressedCache(model.config, CacheCodec.uniform(shape, 4, 4, key_rank=12, value_rank=12), tiny_bases(model))
    forward_loop(model, torch.randint(3, VOCAB, (batch, 200), generator=torch.Generator().manual_seed(6)), cache,
                 prefill=190)
    return cache


def test_bases_nbytes_is_the_storage_of_the_bases():
    cache = filled_cache()
    assert cache.bases_nbytes() == sum(storage_bytes(cache.bases).values()) > 0


def test_allocated_covers_what_is_held():
    cache = filled_cache()
    assert cache.nbytes()["total"] <= cache.reserved_nbytes()


def test_allocated_is_every_storage_the_layers_hold_except_the_bases():
    cache = filled_cache()
    bases = storage_bytes(cache.bases)
    held = {ptr: n for ptr, n in storage_bytes(cache.layers).items() if ptr not in bases}
    assert sum(held.values()) == cache.reserved_nbytes()


def test_uncompressed_layer_falls_back_to_stock_layer():
    model = tiny_model("llama")
    codec = lossless(model)
    codec = codec.with_layer(1, LayerCodec(codec.layers[1].keys, codec.layers[1].values, compressed=False))
    cache = CompressedCache(model.config, codec, tiny_bases(model), torch.float32)
    assert cache.compressed_layers == [0]
    forward_loop(model, torch.randint(3, VOCAB, (1, 45)), cache)
    assert cache.nbytes()["full_precision"] > 0


def test_crop_removes_tokens_exactly():
    model = tiny_model("llama")
    bases = tiny_bases(model)
    ids = torch.randint(3, VOCAB, (1, 60), generator=torch.Generator().manual_seed(7))
    cache = CompressedCache(model.config, lossless(model), bases, torch.float32)
    with torch.no_grad():
        model(input_ids=ids[:, :50], cache=cache, use_cache=True)
        cache.crop(-15)  # reaches into compressed storage (window 4)
        assert cache.get_seq_length() == 35
        got = model(input_ids=ids[:, 35:60], cache=cache, use_cache=True).logits
        ref_cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :35], cache=ref_cache, use_cache=True)
        ref = model(input_ids=ids[:, 35:60], cache=ref_cache, use_cache=True).logits
    assert (ref - got).abs().max().item() <= EXACT


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_roundtrip(bits):
    q = torch.randint(0, 2**bits, (3, 5, 16), dtype=torch.uint8)
    p = pack(q, bits)
    assert p.shape[-1] == 16 * bits // 8
    assert torch.equal(unpack(p, bits), q)


def test_quantization_error_shrinks_with_bits():
    model = tiny_model("llama")
    bases = tiny_bases(model)
    x = torch.randn(1, 2, 50, 16)
    errs = []
    for bits in (2, 4, 8):
        layer = CompressedLayer(LayerCodec(StreamCodec.uniform(16, bits), StreamCodec.uniform(16, bits), 0, 0),
                                bases[(0, "keys")], bases[(0, "values")], flush_block=1)
        layer.update(x, x)
        errs.append((layer.streams["keys"].decode(torch.float32) - x).pow(2).mean().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3 * x.pow(2).mean().item()


# --- bad input -------------------------------------------------------------------------------------------------
def _codec(shape, **kw):
    return CacheCodec(tuple(LayerCodec(StreamCodec.uniform(shape.head_dim, 8), StreamCodec.uniform(shape.head_dim, 8), **kw)
                            for _ in range(shape.num_layers)))


def test_bits_outside_allowed_set_is_rejected():
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    bad = _codec(shape).with_layer(0, LayerCodec(StreamCodec((Segment(16, 3),)), StreamCodec.uniform(16, 8)))
    with pytest.raises(CodecError, match="layer 0 keys: bits=3 is not one of"):
        CompressedCache(model.config, bad, tiny_bases(model))


def test_rank_larger_than_head_dim_is_rejected():
    with pytest.raises(CodecError, match="rank 20 is larger than head_dim 16"):
        StreamCodec.uniform(16, 8, rank=20)


def test_segments_not_covering_head_dim_are_rejected():
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    bad = _codec(shape).with_layer(1, LayerCodec(StreamCodec.uniform(16, 8), StreamCodec((Segment(40, 8),))))
    with pytest.raises(CodecError, match="layer 1 values: segments cover 40 components but the model's head_dim is 16"):
        CompressedCache(model.config, bad, tiny_bases(model))


def test_basis_shape_disagreeing_with_model_is_rejected():
    model = tiny_model("llama")
    bases = tiny_bases(model)
    b = bases[(1, "values")]
    bases[(1, "values")] = StreamBasis(b.mean, torch.zeros(2, 12, 16), b.variance)
    with pytest.raises(CodecError, match="layer 1 values: basis is 2x12x16 but the model and codec need 2x16x16"):
        CompressedCache(model.config, lossless(model), bases, torch.float32)


def test_nan_in_basis_is_rejected():
    model = tiny_model("llama")
    bases = tiny_bases(model)
    bases[(0, "keys")].basis[0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="layer 0 keys: basis contains NaN or Inf"):
        CompressedCache(model.config, lossless(model), bases, torch.float32)


def test_missing_basis_is_rejected():
    model = tiny_model("llama")
    with pytest.raises(CodecError, match="none was given"):
        CompressedCache(model.config, lossless(model), Bases(), torch.float32)
