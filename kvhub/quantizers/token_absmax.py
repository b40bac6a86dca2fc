"""``token``: per token and segment, the absmax of the coefficients (stored in the stream's scale format). Robust to
outlier tokens: the outer level reaches the largest coefficient, nothing clips. (Whitening each component by its
calibrated deviation first measured worse on SmolLM2: int4 full-rank +6.6% PPL against +1.6% without, because it
spreads the error onto the high-variance components.)"""

from __future__ import annotations

import torch

from .base import ScaleScheme


class TokenAbsmax(ScaleScheme):
    name = "token"
    statistic = "absmax"
    per_token = True

    def token_statistic(self, zs: torch.Tensor) -> torch.Tensor:
        return zs.abs().amax(-1, keepdim=True)
