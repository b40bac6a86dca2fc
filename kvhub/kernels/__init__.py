"""Fused kernels for decoding on the compressed storage (Triton on GPU, C on CPU), and the choice of when to use them.

``KVHUB_KERNELS`` picks the decode path: ``auto`` (default) uses the Triton kernels when the tensors are on CUDA and
Triton imports, the C kernels of :mod:`kvhub.kernels.cpu` for CPU tensors where a C compiler built them, PyTorch
otherwise; ``triton`` forces the Triton kernels (on CPU tensors only under ``TRITON_INTERPRET=1``, Triton's
interpreter, which is how the tests prove them without a GPU); ``native`` forces the C kernels (CPU tensors);
``torch`` never uses kernels. Triton is imported only when its kernels are used, so CPU runs never pay for it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import cpu

ENV = "KVHUB_KERNELS"
CHOICES = ("auto", "triton", "native", "torch")
MAX_QUERY_TOKENS = 16  # decode and small speculative batches; prefill keeps the model's own attention


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend(device: torch.device) -> str:
    """``"triton"``, ``"native"`` or ``"torch"``: which decode path to take for tensors on ``device``, following
    ``KVHUB_KERNELS``."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not one of {CHOICES}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but triton is not installed; fix: pip install triton, or unset {ENV}")
        if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{ENV}=triton on {device} tensors needs TRITON_INTERPRET=1 (Triton's CPU interpreter)")
        return "triton"
    cpu_tensors = torch.device(device).type == "cpu"
    if choice == "native":
        if not cpu_tensors:
            raise RuntimeError(f"{ENV}=native runs on CPU tensors, not {device}; fix: unset {ENV} or use triton")
        if cpu.library() is None:
            raise RuntimeError(f"{ENV}=native but no C compiler built the CPU kernels; fix: install gcc or set CC")
        return "native"
    if torch.device(device).type == "cuda" and triton_available():
        return "triton"
    return "native" if cpu_tensors and cpu.library() is not None else "torch"


def decode_attention(query, keys, values, length, exact_k, exact_v, history_mask, exact_mask, scaling, softcap=None,
                     **tuning):
    """Attention of ``query`` [B, Hq, M, d] (M <= 16) over the first ``length`` tokens of the compressed ``keys`` and
    ``values`` streams (:class:`~kvhub.stream.CompressedStream`, [B, Hkv, T, ...]) and the exact tokens ``exact_k``,
    ``exact_v`` [B, Hkv, Te, d], in one softmax. ``history_mask`` [B, M, length] and ``exact_mask`` [B, M, Te] are
    additive (``-inf`` hides a position) or None; ``softcap`` applies ``c * tanh(s / c)`` to the scaled scores before
    the masks. Query head ``i`` reads KV head ``i // (Hq // Hkv)``. Returns [B, Hq, M, d] in ``query.dtype`` (zeros
    for a query every position of which is masked); accumulation is fp32. ``tuning``: ``block_tokens``, ``split_tokens``, ``num_warps``, ``num_stages`` (launch
    choices; they change the speed, not the result beyond rounding)."""
    from .triton_decode import decode_attention as run

    return run(query, keys, values, length, exact_k, exact_v, history_mask, exact_mask, scaling, softcap, **tuning)
