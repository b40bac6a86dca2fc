"""Scalar quantization of PCA coefficients and bit packing.

Quantizers are symmetric mid-rise: ``b`` bits give ``2**b`` levels ``(q - (2**(b-1) - 0.5)) * step``, so all
levels are used (a mid-tread quantizer wastes one of the four 2-bit levels) and centred coefficients need no zero
point. Two ways to pick ``step``:

* ``token``: per token and component group, ``step = absmax / (2**(b-1) - 0.5)``, the absmax stored as fp16. Robust
  to outlier tokens. (Whitening each component by its calibrated deviation first measured worse on SmolLM2: int4
  full-rank +6.6% PPL against +1.6% without, because it spreads the error onto the high-variance components.)
* ``channel``: a static step per component, ``step = GAUSSIAN_STEP[b] * sigma``, the mean-squared-error optimal
  uniform step for a Gaussian source (Max, 1960). Stores nothing per token; clips outliers.
"""

from __future__ import annotations

import torch

# MSE-optimal uniform quantizer step for a unit Gaussian, by number of levels (Max 1960, Table II).
GAUSSIAN_STEP = {2: 0.9957, 4: 0.3352, 8: 0.0308}
CODES_PER_BYTE = {2: 4, 4: 2, 8: 1}


def half_levels(bits: int) -> float:
    return 2 ** (bits - 1) - 0.5


def quantize(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Map ``x`` to uint8 codes in ``[0, 2**bits)``; ``step`` broadcasts against ``x``."""
    h = half_levels(bits)
    q = torch.round(x / step + h)
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize(q: torch.Tensor, step: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(dtype) - half_levels(bits)) * step.to(dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes along the last dim: two 4-bit or four 2-bit codes per byte (low bits first)."""
    per = CODES_PER_BYTE[bits]
    if per == 1:
        return q
    q = q.view(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
    return (q << shifts).sum(-1, dtype=torch.uint8)


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    per = CODES_PER_BYTE[bits]
    if per == 1:
        return p
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=p.device)
    mask = (1 << bits) - 1
    return ((p.unsqueeze(-1) >> shifts) & mask).flatten(-2)
