"""What a quantizer and a scale scheme are. A stream stores, per quantized segment, packed codes and (for per-token
schemes) one scale per token; decoding is ``level_table[code] * scale``. The split: the *scale scheme* says which
statistic of a token's segment is stored (its absmax, its RMS, or nothing: a static per-component deviation), the
*quantizer* says where the ``2**bits`` levels sit in units of that statistic and which code a coefficient gets."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch

# What a scale measures: a bound on the segment's values (absmax) or their spread (one standard deviation).
Statistic = Literal["absmax", "deviation"]


class Quantizer(ABC):
    """Scalar codes: ``2**bits`` levels for a unit scale, and the encoder that picks one per coefficient."""

    name: ClassVar[str]
    statistics: ClassVar[tuple[Statistic, ...]]  # the scale statistics its levels are defined for

    @abstractmethod
    def levels(self, bits: int, statistic: Statistic) -> torch.Tensor:
        """The value of each code ``0 .. 2**bits - 1`` for a scale of 1, float64, increasing."""

    @abstractmethod
    def encode(self, z: torch.Tensor, scale: torch.Tensor, bits: int, statistic: Statistic) -> torch.Tensor:
        """uint8 codes of coefficients ``z``; ``scale`` (float32) broadcasts against ``z``."""


class ScaleScheme(ABC):
    """Which statistic a segment's codes are scaled by, and whether it is stored per token."""

    name: ClassVar[str]
    statistic: ClassVar[Statistic]
    per_token: ClassVar[bool]

    def token_scale(self, zs: torch.Tensor) -> torch.Tensor:
        """The per-token statistic of a segment's coefficients ``zs`` [..., n, size] as stored, [..., n, 1]."""
        raise NotImplementedError(f"the '{self.name}' scale stores nothing per token")
