"""Calibration: streamed moments equal the direct computation, results are deterministic, sinks are left out."""

from __future__ import annotations

import torch

from kvhub.calibration import _Moments, calibrate
from tests.tiny_models import VOCAB, tiny_model


def windows(seed=0, n=3, length=48):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, length), generator=gen) for _ in range(n)]


def test_streamed_moments_equal_direct_pca():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(1, 2, n, 8, generator=gen) * torch.arange(1, 9) for n in (5, 17, 30)]
    moments = _Moments(2, 8, "cpu")
    for c in chunks:
        moments.add(c)
    basis = moments.basis()
    x = torch.cat(chunks, dim=2)[0].double()  # [H, N, d]
    mean = x.mean(1)
    cov = torch.einsum("hnd,hne->hde", x - mean[:, None], x - mean[:, None]) / x.shape[1]
    eig = torch.linalg.eigvalsh(cov).flip(-1)
    assert torch.allclose(basis.mean.double(), mean, atol=1e-6)
    assert torch.allclose(basis.variance.double(), eig, rtol=1e-4, atol=1e-6)
    recon = basis.basis.double() @ torch.diag_embed(basis.variance.double()) @ basis.basis.double().transpose(1, 2)
    assert torch.allclose(recon, cov, atol=1e-4)
    assert (basis.variance[:, :-1] >= basis.variance[:, 1:]).all()  # ordered by variance


def test_calibration_is_deterministic_bit_for_bit():
    model = tiny_model("llama")
    a, stats = calibrate(model, windows(), sink=2, progress=False)
    b, _ = calibrate(model, windows(), sink=2, progress=False)
    assert stats.tokens == 3 * 48 and stats.seq_len == 48
    for key in a:
        for part in ("mean", "basis", "variance"):
            assert torch.equal(getattr(a[key], part), getattr(b[key], part))


def test_sink_positions_are_left_out_of_the_statistics():
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = windows(n=1)
    bases, _ = calibrate(model, ids, sink=4, progress=False)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[0], cache=cache, use_cache=True)
    values = cache.layers[1].values[0]  # [H, T, d]
    assert torch.allclose(bases[(1, "values")].mean, values[:, 4:].mean(1), atol=1e-6)
    assert not torch.allclose(bases[(1, "values")].mean, values.mean(1), atol=1e-6)
