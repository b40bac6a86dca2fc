"""Lloyd-Max levels for a Gaussian source: the MSE-optimal non-uniform scalar quantizer of N(0, 1) (Lloyd 1957,
Max 1960), scaled by a per-token RMS or a calibrated per-component deviation. PCA coefficients, rotated within their
segment, are close to Gaussian; at 2 bits the optimal levels (+-0.4528, +-1.5104) give MSE 0.1175 against 0.1188
for the best uniform step, at 4 bits 0.009497 against 0.01154 (-18%). Decoding costs nothing extra: a stream reads
every quantized segment through a ``[256, codes per byte]`` level table, and these levels are just another table.
Only 2 and 4 bits (the codec refuses 8): Lloyd's iteration needs minutes to settle 256 levels, for a gain in
MSE that 8-bit codes do not need."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .base import ScalarQuantizer, Statistic
from .uniform import GAUSSIAN_STEP, half_levels


@lru_cache(maxsize=None)
def gaussian_levels(bits: int, tol: float = 1e-12, max_iter: int = 200_000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels [2**bits], thresholds [2**bits - 1])`` of the Lloyd-Max quantizer of N(0, 1), float64.

    Lloyd's fixed point with exact Gaussian integrals: thresholds are the midpoints of the levels, each level is the
    conditional mean of its cell, ``(phi(a) - phi(b)) / (Phi(b) - Phi(a))``. Started from the best uniform levels."""
    n = 2**bits
    levels = (torch.arange(n, dtype=torch.float64) - half_levels(bits)) * GAUSSIAN_STEP[bits]
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(max_iter):
        t = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
        pdf = torch.exp(-t.clamp(-40, 40) ** 2 / 2) / math.sqrt(2 * math.pi)
        mass = torch.special.ndtr(t[1:]) - torch.special.ndtr(t[:-1])
        new = (pdf[:-1] - pdf[1:]) / mass
        done = (new - levels).abs().max().item() < tol
        levels = new
        if done:
            break
    return levels, (levels[1:] + levels[:-1]) / 2


class LloydMaxQuantizer(ScalarQuantizer):
    name = "lloyd-max"
    statistics = ("deviation",)  # the levels are those of a unit Gaussian: the scale must be a standard deviation

    def levels(self, bits: int, statistic: Statistic) -> torch.Tensor:
        if bits not in (2, 4):
            raise ValueError(f"Lloyd-Max levels are tabulated for 2 and 4 bits, not {bits}")
        return gaussian_levels(bits)[0].clone()

    def encode(self, z: torch.Tensor, scale: torch.Tensor, bits: int, statistic: Statistic) -> torch.Tensor:
        # the code is the number of thresholds below the value (what torch.bucketize computes, but bucketize
        # measured 9 ms for 1.5k values on CPU against 0.1 ms for these comparisons: 3 or 15 thresholds)
        thresholds = gaussian_levels(bits)[1].to(device=z.device, dtype=torch.float32)
        return ((z / scale).unsqueeze(-1) > thresholds).sum(-1, dtype=torch.uint8)
