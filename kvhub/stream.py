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


@lru_cache(maxsize=None)
def _level_table(quantizer: str, bits: int, statistic: str, device: torch.device) -> torch.Tensor:
    """``[256, codes per byte]``: every byte value unpacked into the levels of its codes for a scale of 1.

    Decoding a segment is then one integer conversion and one row gather (``index_select``), instead of a shift, a
    mask, a float conversion and a centring per code position: at short contexts the step time is made of such
    small ops, not of arithmetic. Any level set (uniform, Lloyd-Max) is just another table."""
    per = CODES_PER_BYTE[bits]
    byte = torch.arange(256, dtype=torch.int64)
    codes = torch.stack([(byte >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], dim=-1)
    return QUANTIZERS[quantizer].levels(bits, statistic)[codes].float().to(device)


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
        self.codes = [GrowableTensor() for _ in self.segments]
        self.quantizer, self.scale = QUANTIZERS[codec.quantizer], SCALES[codec.scale]
        self.n_scaled = sum(1 for s in self.segments if s.bits < 16) if self.scale.per_token else 0
        self.scales = GrowableTensor()
        self._tables = [
            None if s.bits == 16
            else _level_table(codec.quantizer, s.bits, self.scale.statistic, torch.device(device))
            for s in self.segments
        ]

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
            codes = self.quantizer.encode(zs, scale, seg.bits, self.scale.statistic)
            store.append(pack(codes, seg.bits))
        if scales:
            self.scales.append(torch.cat(scales, dim=-1))

    # --- reading -------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.codes[0].length

    def coefficients(self, start: int = 0, length: int | None = None, slot: str = "z") -> torch.Tensor:
        """Dequantized coefficients [B, H, T, r] in float32 of stored tokens ``[start, start + length)``.

        The result lives in a reused per-thread buffer named ``slot``: it is valid until the next call with the same
        slot. Per segment: one integer conversion, one table gather, one multiply by the per-token scales (or the
        static per-component steps) written straight into the output."""
        length = self.length - start if length is None else length
        data0 = self.codes[0].view(start, length)
        batch, heads = data0.shape[:2]
        device = data0.device
        z = _scratch(slot, (batch, heads, length, self.codec.rank), torch.float32, device)
        scales = self.scales.view(start, length) if self.n_scaled else None
        scale_idx = 0
        for seg, (a, b), store, table in zip(self.segments, self.bounds, self.codes, self._tables):
            data = store.view(start, length)
            if table is None:
                z[..., a:b].copy_(data)
                continue
            idx = _scratch("idx", data.shape, torch.int32, device).copy_(data)
            levels = torch.index_select(table, 0, idx.view(-1), out=_scratch("lv", (idx.numel(), table.shape[1]), torch.float32, device))
            levels = levels.view(batch, heads, length, seg.size)
            if not self.scale.per_token:
                torch.mul(levels, self.sigma[:, None, a:b], out=z[..., a:b])
            else:
                torch.mul(levels, scales[..., scale_idx : scale_idx + 1], out=z[..., a:b])
                scale_idx += 1
        return z

    # --- attention in the coefficient space (kvhub.attention) ---------------------------------------------------
    def query_projection(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(q U, q . mean)`` for queries q [B, H, M, d]: what a score against a stored key needs, computed once per
        step instead of rebuilding keys (``q . k = (q U) . z + q . mean``)."""
        if self.basis is None:
            return q, None
        return torch.einsum("bhmd,hdr->bhmr", q, self.basis), q @ self.mean.unsqueeze(-1)

    @staticmethod
    def scores(qu: torch.Tensor, qm: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        """``q . k_t`` [B, H, M, T] from :meth:`query_projection`'s output and stored keys' coefficients ``z``."""
        out = qu @ z.transpose(-1, -2)
        return out if qm is None else out.add_(qm)

    def values(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``sum_t p_t v_t`` [B, H, M, d] for weights p [B, H, M, T] over stored values with coefficients ``z``,
        computed as ``(p Z) U^T + sum(p) mean``: values are never rebuilt."""
        pz = p @ z
        if self.basis is None:
            return pz
        out = torch.einsum("bhmr,hdr->bhmd", pz, self.basis)
        return out.add_(p.sum(-1, keepdim=True) * self.mean[:, None, :])

    def decode(self, dtype: torch.dtype, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Reconstructed vectors [B, H, T, d] (a fresh tensor)."""
        z = self.coefficients(start, length)
        if self.basis is None:
            return z.to(dtype, copy=True)
        x = torch.einsum("bhtr,hdr->bhtd", z, self.basis) + self.mean[:, None, :]
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
