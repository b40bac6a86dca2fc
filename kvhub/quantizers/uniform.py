"""Uniform symmetric mid-rise levels: ``b`` bits give ``2**b`` levels ``(q - (2**(b-1) - 0.5)) * step``, so all
levels are used (a mid-tread quantizer wastes one of the four 2-bit levels) and centred coefficients need no zero
point. The step for a scale of 1 is ``1 / (2**(b-1) - 0.5)`` under an absmax scale (the outer levels reach the
absmax) and the MSE-optimal uniform step for a unit Gaussian under a deviation scale (Max, 1960, Table II)."""

from __future__ import annotations

import torch

from .base import ScalarQuantizer, Statistic

# MSE-optimal uniform quantizer step for a unit Gaussian, by bits (Max 1960, Table II: 2, 4, 8, 16 and 256 levels);
# 1 and 3 bits start the Lloyd-Max iteration of the storage codec's levels.
GAUSSIAN_STEP = {1: 1.596, 2: 0.9957, 3: 0.5860, 4: 0.3352, 8: 0.0308}


def half_levels(bits: int) -> float:
    return 2 ** (bits - 1) - 0.5


class UniformQuantizer(ScalarQuantizer):
    name = "uniform"
    statistics = ("absmax", "deviation")

    @staticmethod
    def unit_step(bits: int, statistic: Statistic) -> float:
        return 1.0 / half_levels(bits) if statistic == "absmax" else GAUSSIAN_STEP[bits]

    def levels(self, bits: int, statistic: Statistic) -> torch.Tensor:
        return (torch.arange(2**bits, dtype=torch.float64) - half_levels(bits)) * self.unit_step(bits, statistic)

    def grid(self, bits: int, statistic: Statistic) -> tuple[float, float]:
        return self.unit_step(bits, statistic), half_levels(bits)

    def encode(self, z: torch.Tensor, scale: torch.Tensor, bits: int, statistic: Statistic) -> torch.Tensor:
        step = scale * self.unit_step(bits, statistic)
        q = torch.round(z / step + half_levels(bits))
        return q.clamp_(0, 2**bits - 1).to(torch.uint8)
