"""The decode plan: everything a decoder needs to know about a stream's codec, compiled once per preset and device.

Every decode path (the PyTorch ops, the C kernels, the Triton kernels, see :mod:`kvhub.backends`) reads a stored
token the same way, and none of them asks the codec anything itself:

* the stored row of a token is read in *storage order* (:mod:`kvhub.layout`: segment by segment, code plane by code
  plane) as *raw values*: ``code - centre`` for evenly spaced levels, ``table[code]`` for tabled ones (Lloyd-Max),
  ``byte_table[byte, plane]`` for vector codes (a byte's components come out together), the 16-bit data as stored;
* each quantized segment's raw values are multiplied by the token's scale for that segment (``scale`` index into
  the stored scales; None where the scale is static, folded into the matrix), read directly for fp16 scales and
  through ``scale_table`` (``[H, groups, 256]``) for byte-coded ones (``log8``);
* the token is then ``matrix[:, :, :rank] @ row + matrix[:, :, rank]``: ``matrix`` [H, d, rank + 1] is the basis in
  storage order with each segment's quantization step (and static per-component scale) folded in, then the stream
  mean.

Levels are centred (``code - centre``), so no offset survives into the matrix and no decoder adds one per token.
Whether levels are evenly spaced is asked of the quantizer (:meth:`~kvhub.quantizers.Quantizer.grid`), whether a
segment is scaled per token of the scale scheme, how a scale is read of the scale format: never of strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import StreamCodec
from .layout import storage_order
from .quant import CODES_PER_BYTE
from .quantizers import QUANTIZERS, SCALE_FORMATS, SCALES


@dataclass(frozen=True)
class SegmentPlan:
    """One kept segment: storage columns ``[start, end)``, ``planes`` code planes of ``width`` columns each (1 plane
    for 8- and 16-bit data); a code's raw value is ``code - centre`` or ``table[code]`` (float32 [2**bits]) for
    tabled levels, or for vector codes ``byte_table[byte, j]`` (float32 [256, planes]) in plane ``j``; ``scale`` the
    column of its per-token scale (None: static, or 16-bit data)."""

    start: int
    end: int
    bits: int
    planes: int
    width: int
    centre: float
    table: torch.Tensor | None
    scale: int | None
    byte_table: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodePlan:
    """How a stream's stored tokens become vectors (module docstring), shared by every cache of a preset on a
    device: ``matrix`` [H, d, rank + 1] = ``[W | mean]``; ``segments`` in storage order; ``scale_table`` [H, groups,
    256] for byte-coded per-token scales (None: fp16 scales, read as stored, or a static scheme)."""

    codec: StreamCodec
    matrix: torch.Tensor
    segments: tuple[SegmentPlan, ...]
    scale_table: torch.Tensor | None

    @property
    def rank(self) -> int:
        return self.codec.rank

    @property
    def scaled_groups(self) -> int:
        """How many per-token scales a token stores."""
        return sum(1 for s in self.segments if s.scale is not None)

    def tensors(self) -> list[torch.Tensor]:
        """Every device tensor the plan keeps alive (what a preset costs a device beyond its bases)."""
        tables = [t for s in self.segments for t in (s.table, s.byte_table) if t is not None]
        return [self.matrix, *tables, *([self.scale_table] if self.scale_table is not None else [])]


def segment_reference(sigma: torch.Tensor, codec: StreamCodec) -> torch.Tensor:
    """[H, groups]: per head and quantized segment, the RMS of its components' calibrated deviations ``sigma`` [H,
    rank] (component order): what a relative scale format (``log8``) codes a token's scale against."""
    parts, start = [], 0
    for seg in codec.kept:
        if seg.bits < 16:
            parts.append(sigma[:, start : start + seg.size].pow(2).mean(-1).sqrt())
        start += seg.size
    return torch.stack(parts, -1) if parts else sigma.new_zeros(sigma.shape[0], 0)


def compile_plan(u: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor, codec: StreamCodec) -> DecodePlan:
    """The plan of ``codec`` over a basis ``u`` [H, d, rank], ``mean`` [H, d] and calibrated deviations ``sigma`` [H,
    rank] (component order, float32, on the target device)."""
    order = torch.tensor(storage_order(codec), device=u.device)
    per_token = SCALES[codec.scale].per_token  # by_bits chooses between per-token schemes only (kvhub.codec)
    scale_format = SCALE_FORMATS[codec.scale_format]
    columns, segments = [], []
    start = scale_index = 0
    for seg in codec.kept:
        end = start + seg.size
        cols = order[start:end]
        w = u.index_select(-1, cols)
        planes = CODES_PER_BYTE.get(seg.bits, 1)
        centre, table, scale, byte_table = 0.0, None, None, None
        if seg.bits < 16:
            scale_name, quantizer_name = codec.code_of(seg.bits)
            scheme, quantizer = SCALES[scale_name], QUANTIZERS[quantizer_name]
            grid = quantizer.grid(seg.bits, scheme.statistic)
            byte_table = quantizer.byte_table(seg.bits, scheme.statistic)
            if byte_table is not None:
                byte_table = byte_table.float().to(u.device)
            elif grid is None:
                table = quantizer.levels(seg.bits, scheme.statistic).float().to(u.device)
            else:
                w, centre = w * grid[0], grid[1]
            if per_token:
                scale, scale_index = scale_index, scale_index + 1
            else:
                w = w * sigma.index_select(-1, cols)[:, None, :]
        columns.append(w)
        segments.append(SegmentPlan(start, end, seg.bits, planes, seg.size // planes, centre, table, scale, byte_table))
        start = end
    matrix = torch.cat([*columns, mean[..., None]], -1).contiguous()
    scale_table = scale_format.table(segment_reference(sigma, codec)) if per_token else None
    return DecodePlan(codec, matrix, tuple(segments), scale_table)
