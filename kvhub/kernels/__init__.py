"""Fused kernels for decoding on the compressed storage: Triton on GPU (:mod:`.triton_decode`), C on CPU
(:mod:`.cpu`, built by :mod:`.native_build`). Which one runs for a call is :mod:`kvhub.backends`' choice."""

from __future__ import annotations

import torch


def backend(device: torch.device | str) -> str:
    """``"triton"``, ``"native"`` or ``"torch"``: the backend a decode step on ``device`` gets here (see
    :func:`kvhub.backends.preferred`)."""
    from ..backends import preferred

    return preferred(device)


def decode_attention(query, keys, values, length, exact_k, exact_v, history_mask, exact_mask, scaling, softcap=None,
                     **tuning):
    """Attention of ``query`` [B, Hq, M, d] (M <= 16) over the first ``length`` tokens of the compressed ``keys`` and
    ``values`` streams (:class:`~kvhub.stream.CompressedStream`, [B, Hkv, T, ...]) and the exact tokens ``exact_k``,
    ``exact_v`` [B, Hkv, Te, d], in one softmax, through the Triton kernels. ``history_mask`` [B, M, length] and
    ``exact_mask`` [B, M, Te] are additive (``-inf`` hides a position) or None; ``softcap`` applies ``c * tanh(s /
    c)`` to the scaled scores before the masks. Query head ``i`` reads KV head ``i // (Hq // Hkv)``. Returns [B, Hq,
    M, d] in ``query.dtype`` (zeros for a query every position of which is masked); accumulation is fp32.
    ``tuning``: ``block_tokens``, ``split_tokens``, ``num_warps``, ``num_stages`` (launch choices; they change the
    speed, not the result beyond rounding)."""
    from .triton_decode import decode_attention as run

    if getattr(keys, "rope", None) is not None:
        raise ValueError("decode_attention scores keys coded after RoPE; these were coded before it: read them with "
                         "kvhub.backends (the PyTorch backend turns each key back by its position)")
    if keys.vector_codes or values.vector_codes:
        raise ValueError("decode_attention reads scalar codes; these streams hold vector codes: read them with "
                         "kvhub.backends (the PyTorch backend looks each byte up in its codebook)")
    return run(query, keys, values, length, exact_k, exact_v, history_mask, exact_mask, scaling, softcap, **tuning)
