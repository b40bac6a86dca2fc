"""``token``: per token and segment, the absmax of the coefficients, stored as fp16. Robust to outlier tokens: the
outer level reaches the largest coefficient, nothing clips. (Whitening each component by its calibrated deviation
first measured worse on SmolLM2: int4 full-rank +6.6% PPL against +1.6% without, because it spreads the error onto
the high-variance components.)"""

from __future__ import annotations

import torch

from .base import ScaleScheme

_TINY = 1e-8
FP16_MAX = torch.finfo(torch.float16).max


def fp16_scale(stat: torch.Tensor) -> torch.Tensor:
    """Clamped to fp16's range: an outlier token of a 16-bit model can exceed 65504, and an infinite scale would
    turn the whole token into NaN; clamped, its largest components saturate instead."""
    return stat.clamp(_TINY, FP16_MAX).half()


class TokenAbsmax(ScaleScheme):
    name = "token"
    statistic = "absmax"
    per_token = True

    def token_scale(self, zs: torch.Tensor) -> torch.Tensor:
        return fp16_scale(zs.abs().amax(-1, keepdim=True))
