"""One compressed stream (the keys or the values of one layer): projection, quantization, packed storage."""

from __future__ import annotations

import threading

import torch

from .bases import StreamBasis
from .codec import StreamCodec
from .quant import CODES_PER_BYTE, GAUSSIAN_STEP, dequantize, half_levels, pack, quantize, unpack
from .storage import GrowableTensor

_TINY = 1e-8


_SCRATCH = threading.local()  # per thread: two generations in two threads must not share a buffer


def _scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer for per-step temporaries the size of the whole history. A fresh allocation that large is
    served by new pages from the OS, and faulting them in cost 3-4x the conversion itself (measured on CPU); the
    buffer holds one plane of one layer at a time, so it does not grow with the layer count."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (dtype, torch.device(device))
    n = int(torch.Size(shape).numel())
    buf = buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = buffers[key] = torch.empty(max(n, 1 << 16), dtype=dtype, device=device)
    return buf[:n].view(shape)


def _as_float(codes: torch.Tensor) -> torch.Tensor:
    return _scratch(codes.shape, torch.float32, codes.device).copy_(codes)


def _planes(data: torch.Tensor, bits: int, a: int, b: int):
    per = CODES_PER_BYTE[bits]
    for j in range(per):
        plane = data
        if j:
            plane = torch.bitwise_right_shift(data, bits * j, out=_scratch(data.shape, torch.uint8, data.device))
        if j < per - 1:  # the top plane needs no mask
            plane = torch.bitwise_and(plane, (1 << bits) - 1, out=_scratch(data.shape, torch.uint8, data.device))
        yield slice(a + j, b, per), slice(j, None, per), _as_float(plane)


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
            self.mean = basis.mean.to(device, torch.float32)
            self.basis = basis.basis[..., : codec.rank].to(device, torch.float32)
            sigma = basis.variance[..., : codec.rank].clamp_min(0).sqrt().to(device, torch.float32)
            self.sigma = sigma.clamp_min(sigma.amax(-1, keepdim=True) * 1e-6 + _TINY)  # [H, r]
        else:
            self.mean = self.basis = None
            self.sigma = None
        self.codes = [GrowableTensor() for _ in self.segments]
        self.n_scaled = sum(1 for s in self.segments if s.bits < 16) if codec.scale != "channel" else 0
        self.scales = GrowableTensor()

    # --- writing -------------------------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] -> coefficients [B, H, n, r] in float32."""
        x = x.float()
        if self.basis is None:
            return x
        return torch.einsum("bhnd,hdr->bhnr", x - self.mean[:, None, :], self.basis)

    def _sigma(self, a: int, b: int) -> torch.Tensor | None:
        return None if self.sigma is None else self.sigma[:, None, a:b]  # [H, 1, size]

    def _token_scale(self, zs: torch.Tensor) -> torch.Tensor:
        """Per-token statistic stored for a segment: its absmax (``token``) or its RMS (``rms``)."""
        if self.codec.scale == "token":
            return zs.abs().amax(-1, keepdim=True)
        return zs.pow(2).mean(-1, keepdim=True).sqrt()

    def _step(self, scale: torch.Tensor, bits: int) -> torch.Tensor:
        if self.codec.scale == "token":
            return scale.float() / half_levels(bits)
        return scale.float() * GAUSSIAN_STEP[bits]

    def append(self, x: torch.Tensor) -> None:
        z = self.project(x)
        scales = []
        for seg, (a, b), store in zip(self.segments, self.bounds, self.codes):
            zs = z[..., a:b]
            if seg.bits == 16:
                store.append(zs.to(self.passthrough_dtype))
                continue
            if self.codec.scale in ("token", "rms"):
                scale = self._token_scale(zs).clamp_min(_TINY).half()
                scales.append(scale)
                q = quantize(zs, self._step(scale, seg.bits), seg.bits)
            else:
                q = quantize(zs, GAUSSIAN_STEP[seg.bits] * self._sigma(a, b), seg.bits)
            store.append(pack(q, seg.bits))
        if scales:
            self.scales.append(torch.cat(scales, dim=-1))

    # --- reading -------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.codes[0].length

    def coefficients(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized coefficients [B, H, T, r] (whitening undone)."""
        parts = []
        scale_idx = 0
        scales = self.scales.view() if self.n_scaled else None
        for seg, (a, b), store in zip(self.segments, self.bounds, self.codes):
            data = store.view()
            if seg.bits == 16:
                parts.append(data.to(dtype))
                continue
            q = unpack(data, seg.bits)
            if self.codec.scale in ("token", "rms"):
                step = self._step(scales[..., scale_idx : scale_idx + 1], seg.bits)
                scale_idx += 1
            else:
                step = GAUSSIAN_STEP[seg.bits] * self._sigma(a, b)
            parts.append(dequantize(q, step, seg.bits, torch.float32).to(dtype))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    # --- attention in the coefficient space (kvhub.attention) ---------------------------------------------------
    def _segment_planes(self, length: int):
        """Yield ``(offset, step, planes)`` per segment over the first ``length`` tokens; ``planes`` yields
        ``(cols, rel, levels)``, one *plane* per code position in a byte (``rel``: its columns within the segment): plane ``j`` of a 4-bit segment holds components
        ``a+j, a+j+2, ...`` as float levels [B, H, T, n] (in a reused scratch buffer: consume each before the next).

        Decoding cost is dominated by passes over the history, not by arithmetic, so: planes need one shift or mask
        each and no interleaving copy (a broadcast unpack measured 1.8x slower at 4k tokens); levels stay uncentred
        (``offset`` is subtracted in the small query-side or weight-side product); per-token steps are applied once
        per segment. ``step`` is [B, H, T, 1] (per-token scales), [H, 1, n] (static per-component steps) or None
        (16-bit passthrough)."""
        scales = self.scales.view().narrow(2, 0, length) if self.n_scaled else None
        scale_idx = 0
        for seg, (a, b), store in zip(self.segments, self.bounds, self.codes):
            data = store.view().narrow(2, 0, length)
            if seg.bits == 16:
                yield 0.0, None, iter([(slice(a, b), slice(None), _as_float(data))])
                continue
            if self.codec.scale == "channel":
                step = GAUSSIAN_STEP[seg.bits] * self._sigma(a, b)
            else:
                step = self._step(scales[..., scale_idx : scale_idx + 1], seg.bits)
                scale_idx += 1
            yield half_levels(seg.bits), step, _planes(data, seg.bits, a, b)

    def attention_scores(self, q: torch.Tensor, length: int) -> torch.Tensor:
        """``q @ K_hat^T`` for queries q [B, H, M, d] (float32) against the first ``length`` stored keys, computed as
        ``(q U) Z^T + q . mean``: keys are never rebuilt, and no per-step d x r projection of the history is done."""
        qu = q if self.basis is None else torch.einsum("bhmd,hdr->bhmr", q, self.basis)
        out = None
        for offset, step, planes in self._segment_planes(length):
            static = step is not None and step.dim() == 3
            seg_scores = None
            for cols, rel, levels in planes:
                qa = qu[..., cols]
                if static:  # a static per-component step folds into the query
                    qa = qa * step[..., rel]
                part = qa @ levels.transpose(-1, -2)
                if offset:
                    part -= offset * qa.sum(-1, keepdim=True)
                seg_scores = part if seg_scores is None else seg_scores.add_(part)
            if step is not None and not static:  # a per-token step scales each key's column, once per segment
                seg_scores *= step.transpose(-1, -2)
            out = seg_scores if out is None else out.add_(seg_scores)
        if self.mean is not None:
            out += q @ self.mean.unsqueeze(-1)  # [B, H, M, 1]: the mean's score, the same for every key
        return out

    def attention_values(self, p: torch.Tensor, length: int) -> torch.Tensor:
        """``p @ V_hat`` for attention weights p [B, H, M, T] over the first ``length`` stored values, computed as
        ``(p Z) U^T + sum(p) mean``, with per-token scales folded into the weights."""
        z = p.new_empty(*p.shape[:-1], self.codec.rank)
        for offset, step, planes in self._segment_planes(length):
            static = step is not None and step.dim() == 3
            w = p * step.transpose(-1, -2) if step is not None and not static else p
            w_sum = w.sum(-1, keepdim=True) if offset else None
            for cols, rel, levels in planes:
                part = w @ levels
                if offset:
                    part -= offset * w_sum
                z[..., cols] = part * step[..., rel] if static else part
        if self.basis is None:
            return z
        return torch.einsum("bhmr,hdr->bhmd", z, self.basis) + p.sum(-1, keepdim=True) * self.mean[:, None, :]

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        """Reconstructed vectors [B, H, T, d]."""
        z = self.coefficients(torch.float32)
        if self.basis is None:
            return z.to(dtype)
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
