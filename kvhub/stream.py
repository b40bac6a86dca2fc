"""One compressed stream (the keys or the values of one layer): projection, quantization, packed storage."""

from __future__ import annotations

import threading
from functools import lru_cache
import torch

from .bases import StreamBasis
from .codec import StreamCodec
from .quant import CODES_PER_BYTE, pack
from .quantizers import QUANTIZERS, SCALES
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
    None for a non-uniform one (Lloyd-Max), which decodes through :func:`_level_table`."""
    levels = QUANTIZERS[quantizer].levels(bits, statistic)
    steps = levels.diff()
    if not torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9, atol=0):
        return None
    return float(steps[0]), float(levels[0])


@lru_cache(maxsize=None)
def _level_table(quantizer: str, bits: int, statistic: str, device: torch.device) -> torch.Tensor:
    """``[256, codes per byte]``: every byte value unpacked into the levels of its codes for a unit scale, for level
    sets no arithmetic unpacks (a gather is ~2.5x slower per element than shifts on CPU, so uniform sets skip it)."""
    per = CODES_PER_BYTE[bits]
    byte = torch.arange(256, dtype=torch.int64)
    codes = torch.stack([(byte >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], dim=-1)
    return QUANTIZERS[quantizer].levels(bits, statistic)[codes].float().to(device)


def _augmented(u: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor | None, codec: StreamCodec) -> torch.Tensor:
    """``[U | mean | S]`` [H, d, r + 1 + q] for a stream with ``q`` quantized segments, ``S_j`` the sum of segment
    ``j``'s columns of ``U`` (weighted by the static steps of the ``channel`` scheme).

    Against it, coefficients are read as ``[q * step * scale, 1, lowest * scale_j]`` for uniform levels
    ``lowest + q * step`` (``q`` the raw code), so ``[...] @ [U | mean | S]^T`` is the reconstruction, and
    ``q [U | mean | S] . [...]`` is the score. Centring and the mean cost a few columns in the matmuls that run
    anyway, instead of passes over the history: at short contexts step time is made of such passes and ops."""
    sums, start = [], 0
    for seg in codec.kept:
        if seg.bits < 16:
            cols = u[..., start : start + seg.size]
            if not SCALES[codec.scale].per_token:
                cols = cols * sigma[:, None, start : start + seg.size]
            sums.append(cols.sum(-1, keepdim=True))
        start += seg.size
    return torch.cat([u, mean[..., None], *sums], -1).contiguous()


def _shared_augmented(basis: StreamBasis | None, codec: StreamCodec, heads: int, device: torch.device) -> torch.Tensor:
    """:func:`_augmented` made once per (basis, codec, device) and shared by every cache of a preset; for an identity
    projection (no basis) once per (codec, heads, device)."""
    memo = basis.__dict__.setdefault("_on_device", {}) if basis is not None else _IDENTITY
    key = ("augmented", torch.device(device), codec, heads)
    if key not in memo:
        if basis is None:
            u, mean, sigma = torch.eye(codec.rank, device=device).expand(heads, -1, -1), torch.zeros(heads, codec.rank, device=device), None
        else:
            mean, u, sigma = _device_basis(basis, codec.rank, device)
        memo[key] = _augmented(u, mean, sigma, codec)
    return memo[key]


_IDENTITY: dict = {}


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
            _shared_augmented(basis, codec, basis.mean.shape[0], torch.device(device))
        self.n_quantized = sum(1 for s in self.segments if s.bits < 16)
        self.codes = [GrowableTensor() for _ in self.segments]
        self.quantizer, self.scale = QUANTIZERS[codec.quantizer], SCALES[codec.scale]
        self.n_scaled = sum(1 for s in self.segments if s.bits < 16) if self.scale.per_token else 0
        self.scales = GrowableTensor()

    def augmented_basis(self) -> torch.Tensor:
        """``[U | mean | S]`` [H, d, r + 1 + q], shared by every cache of the preset: see :func:`_augmented`."""
        buf = self.codes[0].buf
        return _shared_augmented(self._source, self.codec, buf.shape[1], buf.device)

    # --- writing -------------------------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] -> coefficients [B, H, n, r] in float32."""
        x = x.float()
        if self.basis is None:
            return x
        return torch.einsum("bhnd,hdr->bhnr", x - self.mean[:, None, :], self.basis)

    def append(self, x: torch.Tensor) -> None:
        z = self.project(x)
        scales = []
        for seg, (a, b), store in zip(self.segments, self.bounds, self.codes):
            zs = z[..., a:b]
            if seg.bits == 16:
                store.append(zs.to(self.passthrough_dtype))
                continue
            if self.scale.per_token:
                stored = self.scale.token_scale(zs)
                scales.append(stored)
                scale = stored.float()
            else:
                scale = self.sigma[:, None, a:b]
            store.append(pack(self.quantizer.encode(zs, scale, seg.bits, self.scale.statistic), seg.bits))
        if scales:
            self.scales.append(torch.cat(scales, dim=-1))

    # --- reading -------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.codes[0].length

    @staticmethod
    def _raw_codes(data: torch.Tensor, bits: int) -> torch.Tensor:
        """uint8 codes [B, H, T, size] in component order from packed bytes: each code position shifted and masked
        into a plane, planes stacked (byte-sized passes; the float pass comes after, once)."""
        per = CODES_PER_BYTE[bits]
        if per == 1:
            return data
        planes = []
        for j in range(per):
            plane = data
            if j:
                plane = torch.bitwise_right_shift(data, bits * j, out=_scratch(f"p{j}", data.shape, torch.uint8, data.device))
            if j < per - 1:  # the top code position needs no mask
                plane = torch.bitwise_and(plane, (1 << bits) - 1, out=_scratch(f"p{j}", data.shape, torch.uint8, data.device))
            planes.append(plane)
        levels = torch.stack(planes, -1, out=_scratch("codes", (*data.shape, per), torch.uint8, data.device))
        return levels.flatten(-2)

    def augmented_coefficients(self, start: int = 0, length: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[q * step * scale, 1, lowest * scale_j]`` [B, H, T, r + 1 + q] in float32 for stored tokens
        ``[start, start + length)`` (see :func:`_augmented`), written into ``out`` or a fresh tensor.

        Uniform levels: the codes are unpacked in byte-sized passes, then converted and scaled in one float pass.
        Non-uniform levels (Lloyd-Max) go through a byte->levels table, already centred (their offset column is 0)."""
        length = self.length - start if length is None else length
        data0 = self.codes[0].view(start, length)
        batch, heads = data0.shape[:2]
        device, rank = data0.device, self.codec.rank
        z = out if out is not None else torch.empty(batch, heads, length, rank + 1 + self.n_quantized, device=device)
        scales = self.scales.view(start, length) if self.n_scaled else None
        scale_idx = quantized = 0
        for seg, (a, b), store in zip(self.segments, self.bounds, self.codes):
            data = store.view(start, length)
            if seg.bits == 16:
                z[..., a:b].copy_(data)
                continue
            offset = z[..., rank + 1 + quantized : rank + 2 + quantized]
            if self.scale.per_token:
                scale = scales[..., scale_idx : scale_idx + 1].float()
                scale_idx += 1
            else:
                scale = self.sigma[:, None, a:b]
            uniform = _levels(self.codec.quantizer, seg.bits, self.scale.statistic)
            if uniform is None:  # tabled levels, already centred: nothing to offset
                table = _level_table(self.codec.quantizer, seg.bits, self.scale.statistic, device)
                idx = _scratch("idx", data.shape, torch.int32, device).copy_(data)
                levels = torch.index_select(table, 0, idx.view(-1), out=_scratch("lv", (idx.numel(), table.shape[1]), torch.float32, device))
                torch.mul(levels.view(batch, heads, length, seg.size), scale, out=z[..., a:b])
                offset.fill_(0.0)
            else:
                step, lowest = uniform
                torch.mul(self._raw_codes(data, seg.bits), scale * step, out=z[..., a:b])
                if self.scale.per_token:
                    torch.mul(scale, lowest, out=offset)
                else:
                    offset.fill_(lowest)
            quantized += 1
        z[..., rank].fill_(1.0)
        return z

    def coefficients(self, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Dequantized coefficients ``z`` [B, H, T, r] of stored tokens ``[start, start + length)`` (a fresh tensor):
        :meth:`augmented_coefficients` with each segment's offset column added back."""
        z = self.augmented_coefficients(start, length)
        rank, quantized = self.codec.rank, 0
        out = z[..., :rank].clone()
        for seg, (a, b) in zip(self.segments, self.bounds):
            if seg.bits == 16:
                continue
            offset = z[..., rank + 1 + quantized : rank + 2 + quantized]
            out[..., a:b] += offset if self.scale.per_token else offset * self.sigma[:, None, a:b]
            quantized += 1
        return out

    def decode(self, dtype: torch.dtype, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Reconstructed vectors [B, H, T, d] (a fresh tensor)."""
        x = self.augmented_coefficients(start, length) @ self.augmented_basis().transpose(-1, -2)
        return x.to(dtype)

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
