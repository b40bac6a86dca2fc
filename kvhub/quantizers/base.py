"""What a quantizer, a scale scheme and a scale format are. A stream stores, per quantized segment, packed codes and
(for per-token schemes) one scale per token; decoding is ``level_table[code] * scale``. The split: the *scale
scheme* says which statistic of a token's segment is measured (its absmax, its RMS, or nothing: a static
per-component deviation), the *scale format* how that per-token number is stored (fp16, or an 8-bit code), the
*quantizer* where the ``2**bits`` levels sit in units of the scale and which code a coefficient gets (or, for
vector codes, which codeword a group of coefficients gets: :mod:`.vector`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch

from ..quant import pack

# What a scale measures: a bound on the segment's values (absmax) or their spread (one standard deviation).
Statistic = Literal["absmax", "deviation"]


class Quantizer(ABC):
    """Codes for a segment's coefficients in units of their scale: what each stored byte holds and decodes to."""

    name: ClassVar[str]
    statistics: ClassVar[tuple[Statistic, ...]]  # the scale statistics its levels are defined for

    @abstractmethod
    def levels(self, bits: int, statistic: Statistic) -> torch.Tensor:
        """The value of each code ``0 .. 2**bits - 1`` for a scale of 1, float64, increasing (for vector codes,
        the distinct component values they decode to: what bounds a decoded component)."""

    @abstractmethod
    def encode_packed(self, z: torch.Tensor, scale: torch.Tensor, bits: int, statistic: Statistic) -> torch.Tensor:
        """The bytes a ``bits``-bit segment stores for coefficients ``z`` [..., size]: uint8 [..., size * bits / 8]
        (:mod:`kvhub.layout`); ``scale`` (float32) broadcasts against ``z``."""

    def grid(self, bits: int, statistic: Statistic) -> tuple[float, float] | None:
        """``(step, centre)`` when the levels are evenly spaced, ``level(q) = (q - centre) * step``, so a decoder
        computes a level from its code with no table; None where the levels must be looked up (:meth:`levels`)."""
        return None

    def byte_table(self, bits: int, statistic: Statistic) -> torch.Tensor | None:
        """For codes that take a whole byte jointly (vector codes): float32 [256, 8 // bits], the components each
        stored byte decodes to, in its components' order; None where each code in a byte is read alone."""
        return None

    def fingerprint(self) -> bytes:
        """What a stored code's meaning depends on beyond the preset's config: the digest of a packaged codebook,
        so bytes written at rest name it (:func:`kvhub.integrations.chunks.preset_digest`); empty where the levels
        are defined by the code alone."""
        return b""


class ScalarQuantizer(Quantizer):
    """One code per coefficient, packed ``8 / bits`` to a byte (:mod:`kvhub.quant`)."""

    @abstractmethod
    def encode(self, z: torch.Tensor, scale: torch.Tensor, bits: int, statistic: Statistic) -> torch.Tensor:
        """uint8 codes of coefficients ``z``; ``scale`` (float32) broadcasts against ``z``."""

    def encode_packed(self, z: torch.Tensor, scale: torch.Tensor, bits: int, statistic: Statistic) -> torch.Tensor:
        return pack(self.encode(z, scale, bits, statistic), bits)


class ScaleScheme(ABC):
    """Which statistic a segment's codes are scaled by, and whether it is stored per token."""

    name: ClassVar[str]
    statistic: ClassVar[Statistic]
    per_token: ClassVar[bool]

    def token_statistic(self, zs: torch.Tensor) -> torch.Tensor:
        """The per-token statistic of a segment's coefficients ``zs`` [..., n, size], float32 [..., n, 1] (the scale
        format rounds it to what is stored)."""
        raise NotImplementedError(f"the '{self.name}' scale stores nothing per token")


class ScaleFormat(ABC):
    """How one per-token scale is stored: ``dtype`` elements, ``bits`` each. ``store`` turns statistics into what is
    stored, ``load`` turns that back into the fp16 scales the decoders multiply by. ``reference`` [H, groups] is a
    per head and segment typical size of the statistic (from the calibrated variances), for formats that code a
    scale relative to it; rounding is upward for an absmax (the outer level still reaches the largest coefficient)
    and to the nearest for a deviation."""

    name: ClassVar[str]
    dtype: ClassVar[torch.dtype]
    bits: ClassVar[int]
    relative: ClassVar[bool]  # codes scales against ``reference`` (else it is ignored and never computed)

    @abstractmethod
    def store(self, stat: torch.Tensor, reference: torch.Tensor | None, statistic: Statistic) -> torch.Tensor:
        """``stat`` float32 [B, H, n, groups] -> stored [B, H, n, groups] of ``dtype``."""

    @abstractmethod
    def load(self, stored: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        """Stored [B, H, n, groups] -> fp16 scales of the same shape (a view where nothing needs converting)."""

    def table(self, reference: torch.Tensor | None) -> torch.Tensor | None:
        """For a format stored as byte codes: float32 [H, groups, 256], the scale each code loads as (what
        :meth:`load` gives, fp16-rounded), so a kernel reads the byte and looks its scale up with no conversion
        pass; None where the stored value is the fp16 scale itself."""
        return None
