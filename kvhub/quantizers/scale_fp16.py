"""``fp16``: each per-token scale stored as an fp16 number, 16 bits. Clamped to fp16's range: an outlier token of a
16-bit model can exceed 65504, and an infinite scale would turn the whole token into NaN; clamped, its largest
components saturate instead."""

from __future__ import annotations

import torch

from .base import ScaleFormat, Statistic

_TINY = 1e-8
FP16_MAX = torch.finfo(torch.float16).max


class Fp16Scale(ScaleFormat):
    name = "fp16"
    dtype = torch.float16
    bits = 16
    relative = False

    def store(self, stat: torch.Tensor, reference: torch.Tensor | None, statistic: Statistic) -> torch.Tensor:
        return stat.clamp(_TINY, FP16_MAX).half()

    def load(self, stored: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        return stored
