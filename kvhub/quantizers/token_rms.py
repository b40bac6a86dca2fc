"""``rms``: per token and segment, the root mean square of the coefficients (stored in the stream's scale format);
levels are then placed for a unit-deviation source (the MSE-optimal uniform step, or Lloyd-Max levels). Better than
absmax where errors average out (values at 2 bits); clips the rare coefficient beyond the outer level."""

from __future__ import annotations

import torch

from .base import ScaleScheme


class TokenRMS(ScaleScheme):
    name = "rms"
    statistic = "deviation"
    per_token = True

    def token_statistic(self, zs: torch.Tensor) -> torch.Tensor:
        return zs.pow(2).mean(-1, keepdim=True).sqrt()
