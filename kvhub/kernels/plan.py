"""What the fused decode kernels need to know about a compressed stream, prepared once on the host.

The kernels never unpack codes into component order: they work in storage order (:mod:`kvhub.layout`, segment by
segment, plane by plane), and the host reorders the small per-head matrices to match instead: the key projection
``U_k`` (with ``mean_k`` as one extra column, so one matmul gives both ``q U_k`` and ``q . mean_k``) and the value
rotation ``U_v``. Static per-component steps (the ``channel``
scheme) are folded into those columns too, so inside the kernels a level is scaled only by its token's step.

Segment and plane descriptions are plain tuples of ints: Triton specializes the kernels on them (``tl.constexpr``),
which unrolls the loops over segments and planes at compile time.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..layout import pow2, stream_layout
from ..quantizers.uniform import GAUSSIAN_STEP


@dataclass
class StreamMatrices:
    """Per KV head, in storage order, float32: ``basis`` [H, d, r] with static steps folded in; ``mean`` [H, d]."""

    basis: torch.Tensor
    mean: torch.Tensor
    key_projection: torch.Tensor  # [H, d, r + 1]: basis then mean, for q -> (q U, q . mean) in one matmul


_MATRICES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fingerprint(stream) -> tuple:
    """Identity and in-place version of every tensor the matrices derive from: a rebuilt or edited basis is seen."""
    parts = []
    for t in (stream.basis, stream.mean, stream.sigma):
        parts.append(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device))
    return tuple(parts)


def stream_matrices(stream, head_dim: int, heads: int, device: torch.device) -> StreamMatrices:
    """The storage-order matrices of ``stream`` (a :class:`~kvhub.stream.CompressedStream`), cached per stream."""
    key = _fingerprint(stream)
    cached = _MATRICES.get(stream)
    if cached is not None and cached[0] == key:
        return cached[1]
    layout = stream_layout(stream.codec)
    order = torch.tensor(layout.order, device=device)
    if stream.basis is None:  # identity projection: coefficients are the vector itself
        basis = torch.eye(head_dim, device=device).expand(heads, head_dim, head_dim)
        mean = torch.zeros(heads, head_dim, device=device)
    else:
        basis, mean = stream.basis.to(device, torch.float32), stream.mean.to(device, torch.float32)
    basis = basis.index_select(-1, order)
    if stream.codec.scale == "channel":
        sigma = stream.sigma
        steps = torch.cat([GAUSSIAN_STEP[s.bits] * sigma[:, a:b] if s.bits < 16 else torch.ones_like(sigma[:, a:b])
                           for s, (a, b) in zip(stream.segments, stream.bounds)], dim=-1)
        basis = basis * steps.to(device, torch.float32).index_select(-1, order)[:, None, :]
    basis = basis.contiguous()
    mats = StreamMatrices(basis, mean.contiguous(), torch.cat([basis, mean[..., None]], dim=-1).contiguous())
    _MATRICES[stream] = (key, mats)
    return mats
