"""``channel``: no per-token scale; each component is scaled by its calibrated standard deviation (the basis'
``sigma``). Stores nothing per token, so it costs no scale bytes; clips outlier tokens."""

from __future__ import annotations

from .base import ScaleScheme


class ChannelSigma(ScaleScheme):
    name = "channel"
    statistic = "deviation"
    per_token = False
