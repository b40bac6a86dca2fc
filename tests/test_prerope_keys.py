"""benchmarks/prerope_keys.py measures keys coded before RoPE through its own cache layer: the layer must be the
engine's arithmetic (against :class:`kvhub.CompressedCache`), its rotation transformers' RoPE, and its un-rotation
lossless (against DynamicCache)."""

from __future__ import annotations

import importlib
import sys
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvhub import CompressedCache, ModelShape
from kvhub.calibration import calibrate
from kvhub.codec import CacheCodec, LayerCodec, Segment, StreamCodec
from kvhub.eval.ppl import window_nll
from tests.paths import ROOT
from tests.tiny_models import VOCAB, tiny_bases, tiny_model


@pytest.fixture(scope="module")
def prerope():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("prerope_keys")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _codec(model, bits: int) -> CacheCodec:
    shape = ModelShape.from_config(model.config)
    d = shape.head_dim
    keys = StreamCodec((Segment(d // 2, bits), Segment(d - d // 2, 16 if bits == 16 else 2)), "pca", "token")
    values = StreamCodec((Segment(d, bits),), "pca", "rms")
    return CacheCodec(tuple(LayerCodec(keys, values, 4, 0) for _ in range(shape.num_layers)), flush_block=16)


def test_turn_is_transformers_rope_and_its_inverse_undoes_it(prerope, llama):
    gen = torch.Generator().manual_seed(0)
    shape = ModelShape.from_config(llama.config)
    q, k = torch.randn(2, 1, shape.num_kv_heads, 37, shape.head_dim, generator=gen).unbind()
    positions = torch.arange(100, 137)
    cos, sin = prerope.rope(llama, positions, k)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(prerope.turn(k, cos, sin), want_k)
    torch.testing.assert_close(prerope.turn(q, cos, sin), want_q)
    torch.testing.assert_close(prerope.turn(want_k, cos, sin, inverse=True), k, atol=1e-5, rtol=1e-5)


def test_unrotated_cached_keys_are_the_k_proj_output(prerope, llama):
    ids = torch.randint(3, VOCAB, (1, 80), generator=torch.Generator().manual_seed(1))
    assert prerope.unrotation_error(llama, ids) < 1e-5


def test_decoded_past_layer_reads_as_the_engine_does(prerope, llama):
    """Post-RoPE keys: the layer's NLL is the engine's (sink exact, every later token coded, chunk by chunk)."""
    shape = ModelShape.from_config(llama.config)
    codec = _codec(llama, 2)
    bases = tiny_bases(llama).rotated_for(codec, shape)
    ids = torch.randint(3, VOCAB, (1, 200), generator=torch.Generator().manual_seed(2))
    engine_cache, layer_cache = CompressedCache(llama.config, codec, bases), prerope.decoded_past_cache(llama, codec, bases, False)
    engine = window_nll(llama, ids, engine_cache, chunk=32)
    layer = window_nll(llama, ids, layer_cache, chunk=32)
    exact = window_nll(llama, ids, DynamicCache(config=llama.config), chunk=32)
    for held, ours in zip(engine_cache.layers, layer_cache.layers):  # the same codes: the same inputs were coded
        for name, kept in (("keys", ours.keys), ("values", ours.values)):
            coded = held.streams[name].decode(torch.float32)  # (the engine holds the last 8 tokens exact, unread)
            assert coded.shape[-2] == 200 - 4 - 8
            torch.testing.assert_close(kept[:, :, 4 : 4 + coded.shape[-2]], coded, rtol=0, atol=1e-6)
    lost = engine.nll_sum - exact.nll_sum
    assert abs(lost) > 0.05  # the codes lose something (a random tiny model loses little) ...
    assert layer.tokens == engine.tokens
    assert layer.nll_sum - exact.nll_sum == pytest.approx(lost, rel=1e-3)  # ... and the layer loses the same


def test_pre_rope_keys_round_trip_through_a_lossless_codec(prerope, llama):
    """16-bit codes keep every coefficient: un-rotate, code, decode and rotate back reads as DynamicCache does."""
    shape = ModelShape.from_config(llama.config)
    codec = _codec(llama, 16)
    post, pre = prerope.calibrate_both(llama, [torch.randint(3, VOCAB, (1, 64), generator=torch.Generator().manual_seed(s))
                                               for s in range(4)])
    ids = torch.randint(3, VOCAB, (1, 192), generator=torch.Generator().manual_seed(3))
    raw = []
    hook = llama.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, out: raw.append(out))
    exact = window_nll(llama, ids, DynamicCache(config=llama.config), chunk=32)
    hook.remove()
    cache = prerope.decoded_past_cache(llama, codec, pre.rotated_for(codec, shape), prerope=True)
    layer = window_nll(llama, ids, cache, chunk=32)
    assert layer.nll_sum == pytest.approx(exact.nll_sum, rel=1e-4)
    # what was coded is the key before RoPE, at its own position: layer 0's k_proj output
    unrotated = torch.cat(raw, 1).view(1, 192, shape.num_kv_heads, shape.head_dim).transpose(1, 2)[:, :, 4:]
    torch.testing.assert_close(cache.layers[0].streams["keys"].decode(torch.float32), unrotated, rtol=2e-3, atol=2e-3)
    # and the pre-RoPE bases are other bases than the post-RoPE ones: the keys were fitted un-rotated
    assert not torch.allclose(pre[(0, "keys")].basis, post[(0, "keys")].basis, atol=1e-2)


def test_the_harness_pre_rope_layer_is_the_engines_keys_before_rope(prerope, llama):
    """The measurements that argued for keys before RoPE are what the engine now does: the harness's un-rotated bases
    are ``calibrate(keys_before_rope=True)``'s, and its pre-RoPE layer codes and loses what the engine's does."""
    shape = ModelShape.from_config(llama.config)
    windows = [torch.randint(3, VOCAB, (1, 64), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    _, harness_bases = prerope.calibrate_both(llama, windows)
    engine_bases, _ = calibrate(llama, windows, sink=prerope.SINK, progress=False, keys_before_rope=True)
    for key, basis in engine_bases.items():
        torch.testing.assert_close(harness_bases[key].variance, basis.variance, rtol=1e-4, atol=1e-6)
    codec = replace(_codec(llama, 2), keys_before_rope=True)
    bases = engine_bases.rotated_for(codec, shape)
    ids = torch.randint(3, VOCAB, (1, 200), generator=torch.Generator().manual_seed(2))
    engine_cache = CompressedCache(llama.config, codec, bases)
    layer_cache = prerope.decoded_past_cache(llama, codec, bases, prerope=True)
    engine = window_nll(llama, ids, engine_cache, chunk=32)
    layer = window_nll(llama, ids, layer_cache, chunk=32)
    exact = window_nll(llama, ids, DynamicCache(config=llama.config), chunk=32)
    for held, ours in zip(engine_cache.layers, layer_cache.layers):
        coded = held.streams["keys"].decode(torch.float32)
        assert coded.shape[-2] == 200 - 4 - 8
        torch.testing.assert_close(ours.keys[:, :, 4 : 4 + coded.shape[-2]], coded, rtol=0, atol=1e-5)
    lost = engine.nll_sum - exact.nll_sum
    assert abs(lost) > 0.02  # (less than the post-RoPE codes lose on this model, above)
    assert layer.nll_sum - exact.nll_sum == pytest.approx(lost, rel=1e-3)
