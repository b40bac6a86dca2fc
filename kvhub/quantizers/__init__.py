"""Pluggable quantizers (scalar levels and vector codes), scale schemes and scale formats, one class per module,
selected by the names a preset's codec stores (``quantizer``, ``scale`` and ``scale_format`` of each stream). A new
code is one module and one entry here (and its name in ``kvhub.codec`` and the preset schema, which validate presets
without importing torch)."""

from __future__ import annotations

from .base import Quantizer, ScalarQuantizer, ScaleFormat, ScaleScheme, Statistic
from .channel_sigma import ChannelSigma
from .lloyd_max import LloydMaxQuantizer
from .scale_fp16 import Fp16Scale
from .scale_log8 import Log8Scale
from .token_absmax import TokenAbsmax
from .token_rms import TokenRMS
from .uniform import UniformQuantizer
from .vector import VectorQuantizer

QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in (UniformQuantizer(), LloydMaxQuantizer(), VectorQuantizer())}
SCALES: dict[str, ScaleScheme] = {s.name: s for s in (TokenAbsmax(), TokenRMS(), ChannelSigma())}
SCALE_FORMATS: dict[str, ScaleFormat] = {f.name: f for f in (Fp16Scale(), Log8Scale())}

__all__ = ["QUANTIZERS", "SCALES", "SCALE_FORMATS", "Quantizer", "ScalarQuantizer", "ScaleFormat", "ScaleScheme",
           "Statistic"]
