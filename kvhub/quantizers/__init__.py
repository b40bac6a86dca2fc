"""Pluggable scalar quantizers and scale schemes, one class per module, selected by the names a preset's codec
stores (``quantizer`` and ``scale`` of each stream). A new code is one module and one entry here (and its name in
``kvhub.codec`` and the preset schema, which validate presets without importing torch)."""

from __future__ import annotations

from .base import Quantizer, ScaleScheme, Statistic
from .channel_sigma import ChannelSigma
from .lloyd_max import LloydMaxQuantizer
from .token_absmax import TokenAbsmax
from .token_rms import TokenRMS
from .uniform import UniformQuantizer

QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (UniformQuantizer(), LloydMaxQuantizer())}
SCALES: dict[str, ScaleScheme] = {s.name: s for s in (TokenAbsmax(), TokenRMS(), ChannelSigma())}

__all__ = ["QUANTIZERS", "SCALES", "Quantizer", "ScaleScheme", "Statistic"]
