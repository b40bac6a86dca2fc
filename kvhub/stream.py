"""One compressed stream (the keys or the values of one layer): projection, quantization, packed storage."""

from __future__ import annotations

import torch

from .bases import SIGMA_FLOOR_ABS, SIGMA_FLOOR_REL, StreamBasis
from .codec import StreamCodec
from .layout import storage_order
from .plan import DecodePlan, compile_plan, segment_reference
from .positions import StoredPositions
from .quantizers import QUANTIZERS, SCALE_FORMATS, SCALES
from .rope import RotaryFrame
from .storage import GrowableTensor, Scratch


def _device_basis(basis: StreamBasis, rank: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(mean, U, sigma)`` on ``device`` in float32, made once per basis and device and shared by every cache built
    from the same preset (a 7B preset's bases are ~100 MB: a copy per generation is not affordable)."""
    memo = basis.__dict__.setdefault("_on_device", {})
    key = (torch.device(device), rank)
    if key not in memo:
        mean = basis.mean.to(device, torch.float32)
        u = basis.basis[..., :rank].to(device, torch.float32).contiguous()
        sigma = basis.variance[..., :rank].float().clamp_min(0).sqrt().to(device)
        memo[key] = (mean, u, sigma.clamp_min(sigma.amax(-1, keepdim=True) * SIGMA_FLOOR_REL + SIGMA_FLOOR_ABS))
    return memo[key]


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


def shared_plan(basis: StreamBasis | None, codec: StreamCodec, heads: int, device: torch.device) -> DecodePlan:
    """The :class:`~kvhub.plan.DecodePlan` of ``codec`` made once per (basis, codec, device) and shared by every
    cache of a preset; for an identity projection (no basis) once per (codec, heads, device)."""
    memo = basis.__dict__.setdefault("_on_device", {}) if basis is not None else _IDENTITY
    key = ("plan", torch.device(device), codec, heads)
    if key not in memo:
        if basis is None:
            eye = torch.eye(codec.rank, device=device)
            u, mean = eye.expand(heads, -1, -1), torch.zeros(heads, codec.rank, device=device)
            sigma = torch.ones(heads, codec.rank, device=device)
        else:
            mean, u, sigma = _device_basis(basis, codec.rank, device)
        memo[key] = compile_plan(u, mean, sigma, codec)
    return memo[key]


_IDENTITY: dict = {}


def derived_tensors(basis: StreamBasis) -> list[torch.Tensor]:
    """What streams derived from ``basis`` once per device (device copies, decode plans): shared by every cache."""
    made = basis.__dict__.get("_on_device", {}).values()
    return [t for m in made for t in (m if isinstance(m, tuple) else m.tensors())]


class CompressedStream:
    """Holds a stream's tokens as packed codes (one growable tensor per segment) and per-token scales.

    Coefficients are ``z = (x - mean) @ U`` (``U`` keeps ``rank`` columns); segment ``j`` covers components
    ``[start_j, end_j)`` of ``z`` and stores them at its bit width. ``scratch`` holds the PyTorch decode path's
    per-step temporaries (one per cache, counted in its allocation). With a ``rope`` frame (keys coded before
    RoPE), :meth:`append` un-turns each token by its position before coding, the positions are kept beside the codes
    (:mod:`kvhub.positions`), and :meth:`decode` turns the decoded keys back; codes, rows and coefficients stay
    un-turned."""

    def __init__(
        self, codec: StreamCodec, basis: StreamBasis | None, device: torch.device, passthrough_dtype=torch.float16,
        scratch: Scratch | None = None, rope: RotaryFrame | None = None,
    ) -> None:
        self.codec = codec
        self.rope = rope
        self.positions = StoredPositions() if rope is not None else None
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
            shared_plan(basis, codec, basis.mean.shape[0], torch.device(device))
        self.scratch = scratch if scratch is not None else Scratch()
        self.codes = [GrowableTensor() for _ in self.segments]
        # per kept quantized segment: (quantizer, scale scheme), by its bit width (StreamCodec.code_of)
        self.coders = {s.bits: (QUANTIZERS[q], SCALES[c]) for s in self.segments if s.bits < 16
                         for c, q in [codec.code_of(s.bits)]}
        # bytes that are codewords (kvhub.quantizers.vector): only decoders that look bytes up in a codebook read them
        self.vector_codes = any(q.byte_table(bits, c.statistic) is not None for bits, (q, c) in self.coders.items())
        self.scale_format = SCALE_FORMATS[codec.scale_format]
        self.n_scaled = sum(1 for s in self.segments if s.bits < 16) if SCALES[codec.scale].per_token else 0
        self.scales = GrowableTensor()

    def plan(self) -> DecodePlan:
        """The :class:`~kvhub.plan.DecodePlan` of this stream's tokens, shared by every cache of the preset."""
        buf = self.codes[0].buf
        return shared_plan(self._source, self.codec, buf.shape[1], buf.device)

    # --- writing -------------------------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] -> coefficients [B, H, n, r] in float32."""
        x = x.float()
        if self.basis is None:
            return x
        return torch.einsum("bhnd,hdr->bhnr", x - self.mean[:, None, :], self.basis)

    def reference(self, heads: int, device: torch.device) -> torch.Tensor:
        """[H, groups]: per head and scaled segment, the RMS of the segment's calibrated deviations (1 without a
        basis), what a relative scale format (``log8``) codes its scales against; shared like the plan."""
        memo = self._source.__dict__.setdefault("_on_device", {}) if self._source is not None else _IDENTITY
        key = ("reference", torch.device(device), self.codec, heads)
        if key not in memo:
            sigma = self.sigma if self.sigma is not None else torch.ones(heads, self.codec.rank, device=device)
            memo[key] = (segment_reference(sigma, self.codec),)
        return memo[key][0]

    def _reference_for(self, heads: int, device: torch.device) -> torch.Tensor | None:
        return self.reference(heads, device) if self.scale_format.relative else None

    def append(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Code ``x`` [B, H, n, d]; ``positions`` [B, n]: the RoPE position of each token, required with a rope
        frame (and ignored without one)."""
        if self.rope is not None:
            if positions is None or tuple(positions.shape) != (x.shape[0], x.shape[2]):
                raise ValueError(f"keys coded before RoPE need their positions as [{x.shape[0]}, {x.shape[2]}], got "
                                 f"{None if positions is None else tuple(positions.shape)}")
            x = self.rope.unturn(x, positions)
            self.positions.append(positions)
        z = self.project(x)
        if self.n_scaled:  # the scales as the decoders will read them, rounded to the stored format first
            ref = self._reference_for(z.shape[1], z.device)
            groups = [(self.coders[seg.bits][1], a, b) for seg, (a, b) in zip(self.segments, self.bounds) if seg.bits < 16]
            stored = torch.cat([self.scale_format.store(scheme.token_statistic(z[..., a:b]),
                                                        None if ref is None else ref[:, g : g + 1], scheme.statistic)
                                for g, (scheme, a, b) in enumerate(groups)], -1)
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
            quantizer, scheme = self.coders[seg.bits]
            store.append(quantizer.encode_packed(zs, scale, seg.bits, scheme.statistic))

    # --- reading -------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.codes[0].length

    def raw(self, start: int = 0, length: int | None = None, slot: str | None = None) -> list[torch.Tensor]:
        """The raw values (:mod:`kvhub.plan`) of tokens ``[start, start + length)``, per kept segment, as float32 [B,
        H, planes, T, width] (plane-major: the segment's storage-order columns): centred codes, tabled levels, 16-bit
        data as stored; per-token scales not applied (:meth:`token_scales`). Every pass runs over whole contiguous
        planes (a shift and a mask on 32-bit words, one converting copy). ``slot``: write into the cache's reused
        scratch buffers (valid until the next call with that slot) instead of fresh tensors, for calls repeated at
        every step, where faulting fresh pages in costs more than the conversion."""
        length = self.length - start if length is None else length
        out = []
        for i, (seg, store) in enumerate(zip(self.plan().segments, self.codes)):
            data = store.view(start, length)
            batch, heads, _, width = data.shape
            shape = (batch, heads, seg.planes, length, width)
            if slot:
                dst = self.scratch.get(f"{slot}{i}", shape, torch.float32, data.device)
            else:
                dst = torch.empty(shape, device=data.device)
            if seg.byte_table is not None:  # vector codes: each byte gives its components in every plane at once
                dst.copy_(seg.byte_table[data.long()].permute(0, 1, 4, 2, 3))
            elif seg.planes == 1:
                dst[:, :, 0].copy_(data)
            else:
                if slot:
                    codes = self.scratch.get("codes", shape, torch.uint8, data.device)
                else:
                    codes = torch.empty(shape, dtype=torch.uint8, device=data.device)
                for j in range(seg.planes):
                    _plane(data, codes[:, :, j], j * seg.bits, (1 << seg.bits) - 1)
                dst.copy_(codes)
            if seg.table is not None:
                dst.copy_(seg.table[dst.long()])
            elif seg.centre:
                dst.sub_(seg.centre)
            out.append(dst)
        return out

    def token_scales(self, start: int = 0, length: int | None = None) -> torch.Tensor | None:
        """Per-token scales [B, H, T, groups] as fp16 (a view of what is stored for the fp16 format, converted for
        others: 1/64 of a token's codes at most), or None for a static scheme."""
        if not self.n_scaled:
            return None
        stored = self.stored_scales(start, length)
        return self.scale_format.load(stored, self._reference_for(stored.shape[1], stored.device))

    def stored_scales(self, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Per-token scales [B, H, T, groups] as stored (fp16 numbers or byte codes), a view."""
        return self.scales.view(start, self.length - start if length is None else length)

    def rows(self, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Stored tokens ``[start, start + length)`` as rows against the plan's matrix, float32 [B, H, T, rank + 1]
        (a fresh tensor): raw values times their per-token scales in storage order, then 1 for the mean."""
        plan = self.plan()
        parts = [r.permute(0, 1, 3, 2, 4).flatten(-2) for r in self.raw(start, length)]
        scales = self.token_scales(start, length)
        for seg, part in zip(plan.segments, parts):
            if seg.scale is not None:
                part.mul_(scales[..., seg.scale : seg.scale + 1])
        return torch.cat([*parts, parts[0].new_ones(*parts[0].shape[:3], 1)], -1)

    def coefficients(self, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Dequantized coefficients ``z`` [B, H, T, r] of stored tokens ``[start, start + length)`` in component
        order (a fresh tensor)."""
        plan = self.plan()
        z = self.rows(start, length)[..., : plan.rank]
        order = torch.tensor(storage_order(self.codec), device=z.device)
        for seg in plan.segments:
            if seg.bits == 16:
                continue
            part = z[..., seg.start : seg.end]
            quantizer, scheme = self.coders[seg.bits]
            grid = quantizer.grid(seg.bits, scheme.statistic)
            if grid is not None:
                part.mul_(grid[0])
            if seg.scale is None:
                part.mul_(self.sigma.index_select(-1, order[seg.start : seg.end])[:, None, :])
        return torch.empty_like(z).index_copy_(-1, order, z)

    def decode(self, dtype: torch.dtype, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Reconstructed vectors [B, H, T, d] (a fresh tensor), turned back by their positions with a rope frame."""
        x = self.rows(start, length) @ self.plan().matrix.transpose(-1, -2)
        if self.rope is not None:
            x = self.rope.turn(x, self.stored_positions(start, length))
        return x.to(dtype)

    def stored_positions(self, start: int = 0, length: int | None = None) -> torch.Tensor:
        """The RoPE positions [B, T] of stored tokens ``[start, start + length)`` (keys coded before RoPE)."""
        return self.positions.view(start, length)

    # --- bookkeeping ---------------------------------------------------------------------------------------
    def _stores(self) -> list[GrowableTensor | StoredPositions]:
        return self.codes + [self.scales] + ([self.positions] if self.positions is not None else [])

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
        out = {"codes": sum(s.nbytes() for s in self.codes), "scales": self.scales.nbytes()}
        if self.positions is not None:
            out["positions"] = self.positions.nbytes()
        return out

    def reserved_nbytes(self) -> int:
        """Bytes allocated for this stream's tokens, growth headroom included (the scratch is its cache's)."""
        return sum(s.reserved_nbytes() for s in self._stores())
