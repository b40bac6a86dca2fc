"""The decode backends' declared capabilities, the choice between them, and the guards around compressed attention:
README's table is the declarations, a lost history or a racing switch fails loudly, beams keep their headroom."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from kvhub import CompressedCache, compressed_attention
from kvhub.backends import markdown_table, recording
from kvhub.cli import main
from kvhub.layer import HistoryLostError
from tests.paths import ROOT
from tests.test_user_paths import tiny_setup
from tests.tiny_models import VOCAB


def test_readme_table_is_the_declared_capabilities():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- backends:start -->\n(.*?)\n<!-- backends:end -->", readme, re.S)
    assert block, "README lost its generated backends table"
    assert block.group(1) == markdown_table(), "regenerate it: kvhub backends --markdown"


def test_cli_reports_the_choice(capsys, monkeypatch):
    monkeypatch.setenv("KVHUB_KERNELS", "torch")
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "a decode step on cpu tensors runs on: torch" in out and "backend: native" in out
    monkeypatch.setenv("KVHUB_KERNELS", "gpu")
    assert main(["backends"]) == 1
    assert "KVHUB_KERNELS='gpu' is not one of" in capsys.readouterr().err


def _filled(model, codec, bases, n=40):
    cache = CompressedCache(model.config, codec, bases)
    ids = torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), compressed_attention(model):
        model(input_ids=ids, cache=cache, use_cache=True)
    return cache


def test_history_that_never_reaches_attention_raises():
    """Keys copied between the cache and attention lose the layer's tag: the stock kernel would then attend to the
    exact tokens alone. The layer notices at its next update instead of letting the output be silently wrong."""
    model, codec, bases = tiny_setup()
    cache = _filled(model, codec, bases)
    layer = cache.layers[0]
    kv = torch.randn(2, 2, 1, 16)
    with compressed_attention(model):
        keys, _ = cache.update(kv, kv, 0)
        assert getattr(keys, "_kvhub_layer", None) is layer
        keys.clone()  # what a copy hands on: no tag, nothing reads the history
        with pytest.raises(HistoryLostError, match="compressed_attention"):
            cache.update(kv, kv, 0)


def test_a_thread_leaving_its_block_keeps_the_switch_on_for_another():
    """Two generations over one model in two threads: the one that started first finishing must not turn the
    switch off under the other (its layers would hand their exact tokens to the stock kernel)."""
    model, _, _ = tiny_setup()
    inside, leave = threading.Event(), threading.Event()

    def other():
        with compressed_attention(model):
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    with compressed_attention(model):
        thread.start()
        assert inside.wait(10)
    try:
        assert model.config._attn_implementation.startswith("kvhub_")  # the other thread is still inside
    finally:
        leave.set()
        thread.join(10)
    assert model.config._attn_implementation == "eager"


def test_beam_reorder_keeps_growth_headroom():
    model, codec, bases = tiny_setup()
    cache = _filled(model, codec, bases, n=100)
    stores = [s for layer in cache.layers for stream in layer.streams.values() for s in [*stream.codes, stream.scales]]
    before = [s.buf.shape[2] for s in stores]
    assert any(cap > s.length for cap, s in zip(before, stores))  # there is headroom to keep
    cache.reorder_cache(torch.tensor([1, 0]))
    assert [s.buf.shape[2] for s in stores] == before


def test_prefill_chunk_past_the_kernels_is_recorded_as_a_fallback(monkeypatch):
    model, codec, bases = tiny_setup()
    cache = _filled(model, codec, bases)
    monkeypatch.setenv("KVHUB_KERNELS", "native")
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), compressed_attention(model), recording() as log:
        model(input_ids=ids, cache=cache, use_cache=True)
    layers = model.config.num_hidden_layers
    assert log.calls == {"torch": layers}
    assert log.fallbacks == {("native", "20 query tokens, more than 16"): layers}
