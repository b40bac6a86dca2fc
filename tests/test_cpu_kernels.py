"""The C decode kernels of ``kvhub/kernels/cpu_decode.c`` against an independent float64 reference.

The reference rebuilds every stored token with ``CompressedStream.decode`` and takes plain products with it; the
kernels read the packed bytes themselves. Every codec shape the engine stores is tried: uniform and Lloyd-Max levels,
2/4/8-bit and 16-bit segments (fp16 and bf16), per-token absmax and RMS scales (stored as fp16 or as 8-bit log
codes) and static per-component scales,
PCA and identity projections, a dropped tail, batch 2 with narrowed views."""

from __future__ import annotations

import pytest
import torch

from kvhub.backends import BackendChoiceError
from kvhub.kernels import backend, cpu
from tests.tiny_models import random_stream

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="no C compiler here")

# (segments, projection, scale, quantizer, 16-bit passthrough dtype, scale format)
STREAMS = {
    "keys-4bit-token": ([(64, 4)], "pca", "token", "uniform", torch.float16, "fp16"),
    "values-4-2-rms": ([(32, 4), (32, 2)], "pca", "rms", "uniform", torch.float16, "fp16"),
    "every-width-channel": ([(8, 16), (8, 8), (16, 4), (16, 2), (16, 0)], "pca", "channel", "uniform", torch.bfloat16,
                            "fp16"),
    "identity-16-4": ([(32, 16), (32, 4)], "identity", "rms", "uniform", torch.float16, "fp16"),
    "lloyd-max-rms": ([(32, 4), (32, 2)], "pca", "rms", "lloyd-max", torch.float16, "fp16"),
    "log8-scales": ([(16, 8), (16, 4), (32, 2)], "pca", "token", "uniform", torch.float16, "log8"),
    "log8-identity-rms": ([(32, 16), (32, 4)], "identity", "rms", "uniform", torch.float16, "log8"),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("history", [1, 150])
def test_scores_and_values_match_the_rebuilt_tokens(name, history):
    segments, projection, scale, quantizer, passthrough, scale_format = STREAMS[name]
    stream = random_stream(segments, projection, scale, 3, 64, 2, 170, passthrough, 5, quantizer=quantizer,
                           scale_format=scale_format)
    matrix = stream.plan().matrix  # [H, d, rank + 1]
    gen = torch.Generator().manual_seed(3)
    rows = 5  # query rows per KV head
    q = torch.randn(2, 3, rows, 64, generator=gen)
    x = stream.decode(torch.float32, 0, history).double()  # [B, H, T, d]: rebuilt through the decoder matrix

    out = torch.full((6, rows, history + 7), float("nan"))
    cpu.history_scores(torch.matmul(q, matrix).reshape(6, rows, -1).contiguous(), stream, history, out)
    ref = (q.double() @ x.transpose(-1, -2)).reshape(6, rows, history)
    assert (out[..., :history].double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert out[..., history:].isnan().all()  # nothing written past the history

    p = torch.rand(6, rows, history + 7, generator=gen)
    coords = cpu.history_values(p, stream, history)
    got = coords.view(2, 3, rows, -1).double() @ matrix.double().transpose(-1, -2)
    ref = p[..., :history].double().view(2, 3, rows, history) @ x
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_backend_choice_on_cpu(monkeypatch):
    """auto takes the C kernels for CPU tensors (never Triton's interpreter, even where TRITON_INTERPRET=1); a
    backend asked for where it cannot run falls back to PyTorch instead of failing; a name that is no backend is
    refused in one line."""
    monkeypatch.delenv("KVHUB_KERNELS", raising=False)
    assert backend(torch.device("cpu")) == "native"
    monkeypatch.setenv("KVHUB_KERNELS", "native")
    assert backend(torch.device("cpu")) == "native"
    assert backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("KVHUB_KERNELS", "torch")
    assert backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("KVHUB_KERNELS", "cuda")
    with pytest.raises(BackendChoiceError, match="not one of auto, triton, native, torch"):
        backend(torch.device("cpu"))

