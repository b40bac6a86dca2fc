"""One compressed stream (the keys or the values of one layer): projection, quantization, packed storage."""

from __future__ import annotations

import threading
from functools import lru_cache
import torch

from .bases import StreamBasis
from .codec import StreamCodec
from .quant import CODES_PER_BYTE, GAUSSIAN_STEP, half_levels, pack, quantize
from .storage import GrowableTensor

_TINY = 1e-8
FP16_MAX = torch.finfo(torch.float16).max

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
    """``(mean, U, sigma, [U | mean])`` on ``device`` in float32, made once per basis and device and shared by every
    cache built from the same preset (a 7B preset's bases are ~100 MB: a copy per generation is not affordable).

    ``U`` is a view into the augmented ``[U | mean]`` [H, d, r+1], which attention uses as is for keys
    (``[q U, q . mean] = q [U | mean]``) and transposed for values (``[U^T ; mean]``): one matrix, no second copy."""
    memo = basis.__dict__.setdefault("_on_device", {})
    key = (torch.device(device), rank)
    if key not in memo:
        mean = basis.mean.to(device, torch.float32)
        augmented = torch.cat([basis.basis[..., :rank].to(device, torch.float32), mean[..., None]], -1)
        sigma = basis.variance[..., :rank].float().clamp_min(0).sqrt().to(device)
        sigma = sigma.clamp_min(sigma.amax(-1, keepdim=True) * 1e-6 + _TINY)
        memo[key] = (mean, augmented[..., :rank], sigma, augmented)
    return memo[key]


@lru_cache(maxsize=None)
def _identity_augmented(heads: int, dim: int, device: torch.device) -> torch.Tensor:
    """``[I | 0]``: the augmented basis of an identity projection (coefficients are the vectors, no mean)."""
    return torch.cat([torch.eye(dim, device=device).expand(heads, dim, dim), torch.zeros(heads, dim, 1, device=device)], -1)


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
            self.mean, self.basis, self.sigma, self.augmented = _device_basis(basis, codec.rank, device)
        else:
            self.mean = self.basis = self.sigma = None
            self.augmented = None  # made on first use (:meth:`augmented_basis`), when the head count is known
        self.codes = [GrowableTensor() for _ in self.segments]
        self.n_scaled = sum(1 for s in self.segments if s.bits < 16) if codec.scale != "channel" else 0
        self.scales = GrowableTensor()

    def augmented_basis(self) -> torch.Tensor:
        """``[U | mean]`` [H, d, r+1], shared: see :func:`_device_basis`."""
        if self.augmented is None:
            heads = self.codes[0].buf.shape[1]
            self.augmented = _identity_augmented(heads, self.codec.rank, self.codes[0].buf.device)
        return self.augmented

    def _unit_step(self, bits: int) -> float:
        """The step for a stored scale of 1 (``token``: absmax; ``rms`` and ``channel``: one standard deviation)."""
        return 1.0 / half_levels(bits) if self.codec.scale == "token" else GAUSSIAN_STEP[bits]

    # --- writing -------------------------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] -> coefficients [B, H, n, r] in float32."""
        x = x.float()
        if self.basis is None:
            return x
        return torch.einsum("bhnd,hdr->bhnr", x - self.mean[:, None, :], self.basis)

    def _token_scale(self, zs: torch.Tensor) -> torch.Tensor:
        """Per-token statistic stored for a segment, as fp16: its absmax (``token``) or its RMS (``rms``).
        Clamped to fp16's range: an outlier token of a 16-bit model can exceed 65504, and an infinite scale would
        turn the whole token into NaN; clamped, its largest components saturate instead."""
        stat = zs.abs().amax(-1, keepdim=True) if self.codec.scale == "token" else zs.pow(2).mean(-1, keepdim=True).sqrt()
        return stat.clamp(_TINY, FP16_MAX).half()

    def append(self, x: torch.Tensor) -> None:
        z = self.project(x)
        scales = []
        for seg, (a, b), store in zip(self.segments, self.bounds, self.codes):
            zs = z[..., a:b]
            if seg.bits == 16:
                store.append(zs.to(self.passthrough_dtype))
                continue
            if self.codec.scale == "channel":
                step = GAUSSIAN_STEP[seg.bits] * self.sigma[:, None, a:b]
            else:
                scale = self._token_scale(zs)
                scales.append(scale)
                step = scale.float() * self._unit_step(seg.bits)
            store.append(pack(quantize(zs, step, seg.bits), seg.bits))
        if scales:
            self.scales.append(torch.cat(scales, dim=-1))

    # --- reading -------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.codes[0].length

    def coefficients(self, start: int = 0, length: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dequantized coefficients [B, H, T, r] in float32 of stored tokens ``[start, start + length)``, written
        into ``out`` (any float32 view of that shape whose last dim is contiguous) or a fresh tensor.

        Per segment, each code position of a byte is shifted and masked into its interleaved columns of the output
        (one pass over the codes per position, no interleaving copy), then centred and scaled in place. A table
        lookup per byte does the same in fewer ops but gathers ~2.5x slower per element on CPU (measured); at
        1k tokens the step time is per-element cost, past that it is all there is."""
        length = self.length - start if length is None else length
        data0 = self.codes[0].view(start, length)
        batch, heads = data0.shape[:2]
        device = data0.device
        z = out if out is not None else torch.empty(batch, heads, length, self.codec.rank, device=device)
        scales = self.scales.view(start, length) if self.n_scaled else None
        scale_idx = 0
        for seg, (a, b), store in zip(self.segments, self.bounds, self.codes):
            data = store.view(start, length)
            dst = z[..., a:b]
            if seg.bits == 16:
                dst.copy_(data)
                continue
            per = CODES_PER_BYTE[seg.bits]
            planes = dst.unflatten(-1, (seg.size // per, per))
            for j in range(per):
                plane = data
                if j:
                    plane = torch.bitwise_right_shift(data, seg.bits * j, out=_scratch("plane", data.shape, torch.uint8, device))
                if j < per - 1:  # the top code position needs no mask
                    plane = torch.bitwise_and(plane, (1 << seg.bits) - 1, out=_scratch("plane", data.shape, torch.uint8, device))
                planes[..., j].copy_(plane)
            dst.sub_(half_levels(seg.bits))
            if self.codec.scale == "channel":
                dst.mul_(self.sigma[:, None, a:b] * GAUSSIAN_STEP[seg.bits])
            else:
                dst.mul_(scales[..., scale_idx : scale_idx + 1].float().mul_(self._unit_step(seg.bits)))
                scale_idx += 1
        return z

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
