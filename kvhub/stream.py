"""One compressed stream (the keys or the values of one layer): projection, quantization, packed storage."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import torch

from .bases import StreamBasis
from .codec import StreamCodec
from .layout import stream_layout
from .quant import CODES_PER_BYTE, pack
from .quantizers import QUANTIZERS, SCALE_FORMATS, SCALES
from .storage import GrowableTensor

_TINY = 1e-8

_SCRATCH = threading.local()  # per thread: two generations in two threads must not share a buffer


def _scratch(slot: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer for per-step temporaries the size of the whole history (one per ``slot``). A fresh
    allocation that large is served by new pages from the OS, and faulting them in cost 3-4x the conversion itself
    (measured on CPU). Buffers are per process and thread, never per sequence, and do not grow with the layer
    count: each holds one layer's temporaries at a time."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (slot, dtype, torch.device(device))
    n = int(torch.Size(shape).numel())
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = buffers[key] = torch.empty(max(n, 1 << 16), dtype=dtype, device=device)
    return buf[:n].view(shape)


def _device_basis(basis: StreamBasis, rank: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(mean, U, sigma)`` on ``device`` in float32, made once per basis and device and shared by every cache built
    from the same preset (a 7B preset's bases are ~100 MB: a copy per generation is not affordable)."""
    memo = basis.__dict__.setdefault("_on_device", {})
    key = (torch.device(device), rank)
    if key not in memo:
        mean = basis.mean.to(device, torch.float32)
        u = basis.basis[..., :rank].to(device, torch.float32).contiguous()
        sigma = basis.variance[..., :rank].float().clamp_min(0).sqrt().to(device)
        memo[key] = (mean, u, sigma.clamp_min(sigma.amax(-1, keepdim=True) * 1e-6 + _TINY))
    return memo[key]


@lru_cache(maxsize=None)
def _levels(quantizer: str, bits: int, statistic: str) -> tuple[float, float] | None:
    """``(step, lowest level)`` of a uniform level set for a unit scale (level ``q`` is ``lowest + q * step``), or
    None for a non-uniform one (Lloyd-Max), whose codes are read through :func:`_level_table`."""
    levels = QUANTIZERS[quantizer].levels(bits, statistic)
    steps = levels.diff()
    if not torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9, atol=0):
        return None
    return float(steps[0]), float(levels[0])


@lru_cache(maxsize=None)
def _level_table(quantizer: str, bits: int, statistic: str, device: torch.device) -> torch.Tensor:
    """``[2**bits]`` levels of a non-uniform set for a unit scale, indexed by code."""
    return QUANTIZERS[quantizer].levels(bits, statistic).float().to(device)


def _unit_levels(codec: StreamCodec, bits: int) -> tuple[float, float]:
    """``(step, lowest)`` that turn what :meth:`CompressedStream.raw` reads for a ``bits``-bit segment into its level
    for a unit scale: codes of uniform sets, ``(1, 0)`` for tabled sets (read as levels already) and 16-bit data."""
    if bits == 16:
        return 1.0, 0.0
    return _levels(codec.quantizer, bits, SCALES[codec.scale].statistic) or (1.0, 0.0)


def _plane(data: torch.Tensor, dst: torch.Tensor, shift: int, mask: int) -> None:
    """``dst = (data >> shift) & mask`` for packed bytes [B, H, T, width], on 32-bit words when the width allows it
    (4x fewer elements; bits a word shift carries in from the neighbouring byte, or a sign extension, fall outside
    the mask)."""
    if data.shape[-1] % 4 == 0 and data.storage_offset() % 4 == 0 and dst.storage_offset() % 4 == 0:
        data, dst, mask = data.view(torch.int32), dst.view(torch.int32), mask * 0x01010101
    if shift:
        torch.bitwise_right_shift(data, shift, out=dst).bitwise_and_(mask)
    else:
        torch.bitwise_and(data, mask, out=dst)


@dataclass(frozen=True)
class ReadGroup:
    """One kept segment: storage columns ``[start, end)``, ``planes`` code planes of ``width`` columns each (1 plane
    for 8- and 16-bit data), read against one per-token scale (column ``scale`` of the stored scales; None where the
    scale is static and folded into the decoder), with the decoder column of its levels' offset (``lowest *
    scale``; None where there is none to add per token)."""

    start: int
    end: int
    planes: int
    width: int
    scale: int | None
    offset: int | None


@dataclass(frozen=True)
class StreamDecoder:
    """How a stream's stored tokens become vectors, shared by every cache of a preset on a device.

    ``matrix`` [H, d, r + o + 1] is ``[W | O | mean]`` in storage order (:mod:`kvhub.layout`): ``W`` the basis with
    each segment's quantization step (and static per-component scale) folded in, ``O`` one offset vector per group
    with a per-token scale (``lowest`` times the sum of its ``W`` columns over the step), ``mean`` the stream mean
    (plus the offsets of statically scaled segments). A token with raw values ``c`` (:meth:`CompressedStream.raw`)
    and per-token scales ``s_g`` is ``sum_g s_g (W_g c_g + O_g) + mean``: the scales multiply small ``[queries,
    tokens]`` products in attention, never the history itself."""

    matrix: torch.Tensor
    groups: tuple[ReadGroup, ...]


def _decoder(u: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor | None, codec: StreamCodec) -> StreamDecoder:
    order = torch.tensor(stream_layout(codec).order, device=u.device)
    per_token = SCALES[codec.scale].per_token
    columns, offsets, groups = [], [], []
    start = scale_index = 0
    for seg in codec.kept:
        end = start + seg.size
        cols = order[start:end]
        w = u.index_select(-1, cols)
        planes = CODES_PER_BYTE.get(seg.bits, 1)
        if seg.bits == 16:
            columns.append(w)
            groups.append(ReadGroup(start, end, planes, seg.size // planes, None, None))
        else:
            if not per_token:
                w = w * sigma.index_select(-1, cols)[:, None, :]
            step, lowest = _unit_levels(codec, seg.bits)
            columns.append(w * step)
            offset = w.sum(-1) * lowest
            if not per_token:
                mean = mean + offset
                groups.append(ReadGroup(start, end, planes, seg.size // planes, None, None))
            else:
                offset_column = codec.rank + len(offsets) if lowest else None
                groups.append(ReadGroup(start, end, planes, seg.size // planes, scale_index, offset_column))
                if lowest:
                    offsets.append(offset)
                scale_index += 1
        start = end
    matrix = torch.cat([*columns, *(o[..., None] for o in offsets), mean[..., None]], -1).contiguous()
    return StreamDecoder(matrix, tuple(groups))


def _shared_decoder(basis: StreamBasis | None, codec: StreamCodec, heads: int, device: torch.device) -> StreamDecoder:
    """:func:`_decoder` made once per (basis, codec, device) and shared by every cache of a preset; for an identity
    projection (no basis) once per (codec, heads, device)."""
    memo = basis.__dict__.setdefault("_on_device", {}) if basis is not None else _IDENTITY
    key = ("decoder", torch.device(device), codec, heads)
    if key not in memo:
        if basis is None:
            eye = torch.eye(codec.rank, device=device)
            u, mean = eye.expand(heads, -1, -1), torch.zeros(heads, codec.rank, device=device)
            sigma = torch.ones(heads, codec.rank, device=device)
        else:
            mean, u, sigma = _device_basis(basis, codec.rank, device)
        memo[key] = _decoder(u, mean, sigma, codec)
    return memo[key]


_IDENTITY: dict = {}


def derived_tensors(basis: StreamBasis) -> list[torch.Tensor]:
    """What streams derived from ``basis`` once per device (device copies, decoders, scale references): shared by
    every cache."""
    made = basis.__dict__.get("_on_device", {}).values()
    return [t for m in made for t in (m if isinstance(m, tuple) else (m,) if isinstance(m, torch.Tensor) else (m.matrix,))]


class CompressedStream:
    """Holds a stream's tokens as packed codes (one growable tensor per segment) and fp16 per-token scales.

    Coefficients are ``z = (x - mean) @ U`` (``U`` keeps ``rank`` columns); segment ``j`` covers components
    ``[start_j, end_j)`` of ``z`` and stores them at its bit width."""

    def __init__(
        self, codec: StreamCodec, basis: StreamBasis | None, device: torch.device, passthrough_dtype=torch.float16
    ) -> None:
        self.codec = codec
        self.passthrough_dtype = passthrough_dtype
        self.segments = codec.kept
        self.bounds = []
        start = 0
        for s in self.segments:
            self.bounds.append((start, start + s.size))
            start += s.size
        if codec.projection == "pca":
            assert basis is not None
            self.mean, self.basis, self.sigma = _device_basis(basis, codec.rank, device)
        else:
            self.mean = self.basis = self.sigma = None
        self._source = basis
        if basis is not None:  # made now, not at the first decode: what a preset costs a device is known up front
            _shared_decoder(basis, codec, basis.mean.shape[0], torch.device(device))
        self.n_quantized = sum(1 for s in self.segments if s.bits < 16)
        self.codes = [GrowableTensor() for _ in self.segments]
        self.quantizer, self.scale = QUANTIZERS[codec.quantizer], SCALES[codec.scale]
        self.scale_format = SCALE_FORMATS[codec.scale_format]
        self.n_scaled = sum(1 for s in self.segments if s.bits < 16) if self.scale.per_token else 0
        self.scales = GrowableTensor()

    def decoder(self) -> StreamDecoder:
        """The :class:`StreamDecoder` of this stream's tokens, shared by every cache of the preset."""
        buf = self.codes[0].buf
        return _shared_decoder(self._source, self.codec, buf.shape[1], buf.device)

    # --- writing -------------------------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] -> coefficients [B, H, n, r] in float32."""
        x = x.float()
        if self.basis is None:
            return x
        return torch.einsum("bhnd,hdr->bhnr", x - self.mean[:, None, :], self.basis)

    def reference(self, heads: int, device: torch.device) -> torch.Tensor:
        """[H, groups]: per head and scaled segment, the RMS of the segment's calibrated deviations (1 without a
        basis), what a relative scale format (``log8``) codes its scales against; shared like the decoder."""
        memo = self._source.__dict__.setdefault("_on_device", {}) if self._source is not None else _IDENTITY
        key = ("reference", torch.device(device), self.codec, heads)
        if key not in memo:
            if self.sigma is None:
                memo[key] = torch.ones(heads, self.n_scaled, device=device)
            else:
                memo[key] = torch.stack([self.sigma[:, a:b].pow(2).mean(-1).sqrt()
                                         for seg, (a, b) in zip(self.segments, self.bounds) if seg.bits < 16], -1)
        return memo[key]

    def _reference_for(self, heads: int, device: torch.device) -> torch.Tensor | None:
        return self.reference(heads, device) if self.scale_format.relative else None

    def append(self, x: torch.Tensor) -> None:
        z = self.project(x)
        if self.n_scaled:  # the scales as the decoders will read them, rounded to the stored format first
            ref = self._reference_for(z.shape[1], z.device)
            stats = torch.cat([self.scale.token_statistic(z[..., a:b])
                               for seg, (a, b) in zip(self.segments, self.bounds) if seg.bits < 16], -1)
            stored = self.scale_format.store(stats, ref, self.scale.statistic)
            self.scales.append(stored)
            loaded = self.scale_format.load(stored, ref).float()
        group = 0
        for seg, (a, b), store in zip(self.segments, self.bounds, self.codes):
            zs = z[..., a:b]
            if seg.bits == 16:
                store.append(zs.to(self.passthrough_dtype))
                continue
            if self.n_scaled:
                scale = loaded[..., group : group + 1]
                group += 1
            else:
                scale = self.sigma[:, None, a:b]
            store.append(pack(self.quantizer.encode(zs, scale, seg.bits, self.scale.statistic), seg.bits))

    # --- reading -------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.codes[0].length

    def raw(self, start: int = 0, length: int | None = None, slot: str | None = None) -> list[torch.Tensor]:
        """What is stored for tokens ``[start, start + length)``, per kept segment, as float32 [B, H, planes, T,
        width] (plane-major: the segment's storage-order columns, :mod:`kvhub.layout`): the codes of uniform levels,
        the unit levels of tabled (Lloyd-Max) ones, 16-bit data as stored; per-token scales not applied
        (:meth:`token_scales`). Every pass runs over whole contiguous planes (a shift and a mask on 32-bit words, one
        converting copy), the only passes over the history a decode step makes before its matmuls. ``slot``: write
        into reused per-thread buffers (valid until the next call with that slot) instead of fresh tensors."""
        length = self.length - start if length is None else length
        out = []
        for i, (seg, store) in enumerate(zip(self.segments, self.codes)):
            data = store.view(start, length)
            batch, heads, _, width = data.shape
            planes = CODES_PER_BYTE.get(seg.bits, 1)
            shape = (batch, heads, planes, length, width)
            if slot:
                dst = _scratch(f"{slot}{i}", shape, torch.float32, data.device)
            else:
                dst = torch.empty(shape, device=data.device)
            if planes == 1:
                dst[:, :, 0].copy_(data)
            else:
                codes = _scratch("codes", shape, torch.uint8, data.device)
                for j in range(planes):
                    _plane(data, codes[:, :, j], j * seg.bits, (1 << seg.bits) - 1)
                dst.copy_(codes)
            table = self.level_table(seg.bits)
            if table is not None:
                dst.copy_(table[dst.long()])
            out.append(dst)
        return out

    def level_table(self, bits: int) -> torch.Tensor | None:
        """The ``[2**bits]`` unit levels a ``bits``-bit segment's codes index, for non-uniform level sets; None where
        the code itself is the raw value (uniform levels, 16-bit data)."""
        if bits == 16 or _levels(self.codec.quantizer, bits, self.scale.statistic) is not None:
            return None
        return _level_table(self.codec.quantizer, bits, self.scale.statistic, self.codes[0].buf.device)

    def token_scales(self, start: int = 0, length: int | None = None) -> torch.Tensor | None:
        """Per-token scales [B, H, T, groups] as fp16 (a view of what is stored for the fp16 format, converted for
        others: 1/64 of a token's codes at most), or None for a static scheme."""
        if not self.n_scaled:
            return None
        stored = self.scales.view(start, self.length - start if length is None else length)
        return self.scale_format.load(stored, self._reference_for(stored.shape[1], stored.device))

    def rows(self, start: int = 0, length: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`raw` as one float32 [B, H, T, r] tensor in storage order, written into ``out`` (or a fresh one)."""
        parts = [r.permute(0, 1, 3, 2, 4).flatten(-2) for r in self.raw(start, length)]
        return torch.cat(parts, -1, out=out)

    def tokens(self, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Stored tokens ``[start, start + length)`` as rows against the decoder's matrix, float32 [B, H, T, r + o +
        1] (a fresh tensor): raw values times their per-token scales, the scales again in the offset columns, 1."""
        decoder = self.decoder()
        length = self.length - start if length is None else length
        stored = self.codes[0].view(start, length)
        out = torch.empty(*stored.shape[:3], decoder.matrix.shape[-1], device=stored.device)
        self.rows(start, length, out=out[..., : self.codec.rank])
        scales = self.token_scales(start, length)
        for g in decoder.groups:
            if g.scale is not None:
                s = scales[..., g.scale : g.scale + 1]
                out[..., g.start : g.end].mul_(s)
                if g.offset is not None:
                    out[..., g.offset : g.offset + 1].copy_(s)
        out[..., -1].fill_(1.0)
        return out

    def coefficients(self, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Dequantized coefficients ``z`` [B, H, T, r] of stored tokens ``[start, start + length)`` in component
        order (a fresh tensor)."""
        z = self.rows(start, length)
        scales = self.token_scales(start, length)
        order = torch.tensor(stream_layout(self.codec).order, device=z.device)
        a = scale_column = 0
        for seg in self.segments:
            b = a + seg.size
            step, lowest = _unit_levels(self.codec, seg.bits)
            part = z[..., a:b].mul_(step).add_(lowest)
            if seg.bits < 16 and self.scale.per_token:
                part.mul_(scales[..., scale_column : scale_column + 1])
                scale_column += 1
            elif seg.bits < 16:
                part.mul_(self.sigma.index_select(-1, order[a:b])[:, None, :])
            a = b
        return torch.empty_like(z).index_copy_(-1, order, z)

    def decode(self, dtype: torch.dtype, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Reconstructed vectors [B, H, T, d] (a fresh tensor)."""
        return (self.tokens(start, length) @ self.decoder().matrix.transpose(-1, -2)).to(dtype)

    # --- bookkeeping ---------------------------------------------------------------------------------------
    def _stores(self) -> list[GrowableTensor]:
        return self.codes + [self.scales]

    def truncate(self, length: int) -> None:
        for s in self._stores():
            s.truncate(length)

    def drop_front(self, n: int) -> None:
        for s in self._stores():
            s.drop_front(n)

    def map_batch(self, fn) -> None:
        for s in self._stores():
            s.map_batch(fn)

    def to(self, device) -> None:
        for s in self._stores():
            s.to(device)

    def nbytes(self) -> dict[str, int]:
        return {"codes": sum(s.nbytes() for s in self.codes), "scales": self.scales.nbytes()}

    def reserved_nbytes(self) -> int:
        return sum(s.reserved_nbytes() for s in self._stores())
