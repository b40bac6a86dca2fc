"""Fitted PCA bases: per layer, per stream (keys/values), per KV head a mean, an orthonormal basis ordered by
variance, and the variances (eigenvalues). Calibration produces full ``d x d`` bases; a preset stores only the
``d x rank`` columns its codec keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .codec import STREAMS, CacheCodec, ModelShape, StreamCodec
from .errors import CodecError, CodecRangeError
from .quantizers import QUANTIZERS, SCALE_FORMATS, SCALES
from .quantizers.scale_log8 import STEPS_PER_OCTAVE, ZERO
from .storage import exact_dtype_for

# |U^T U - I| allowed. An fp16-stored unit column has each entry rounded by at most 2^-11 of itself, so each Gram
# entry moves by at most 2 * 2^-11 ~ 9.8e-4 (plus second-order terms); fp32 bases are orthonormal to ~1e-6.
ORTHONORMAL_TOL = 2e-3

# How far a decoded key or value vector (one head) may reach, by the dtype it lives in (see :func:`decode_extent`).
# fp16: every element is at most the vector's norm, so a norm within fp16's largest finite value is an fp16 tensor
# with no inf, and its dot product with a query of the same norm (<= 65504^2 ~ 4.3e9) is far inside fp32's range.
# bf16 and fp32 share fp32's exponent range: the binding limit is the attention score, accumulated in fp32, so two
# vectors of norm 2^63 give |q . k| <= 2^126, a quarter of fp32's largest finite value (~2^128), and the squares an
# RMSNorm takes of them stay finite too.
FP16_MAX = 65504.0
WIDE_BUDGET = 2.0**63
# The decoder clamps each component's deviation to at least this fraction of its head's largest plus this absolute
# amount (kvhub.stream._device_basis): a variance below the clamp is not the one the decoder uses, so it is refused.
SIGMA_FLOOR_REL = 1e-6
SIGMA_FLOOR_ABS = 1e-8
# The most a stored per-token scale exceeds the statistic it stands for: log8 rounds an absmax up by one step
# (2^(1/16)); fp16 rounding (2^-11) and log8's nearest rounding of a deviation (2^(1/32)) are smaller.
_SCALE_ROUNDING = 2.0 ** (1 / 16)
# A relative (log8) scale's lowest code, as a fraction of its reference: a token with a smaller statistic is decoded
# at this scale anyway.
_RELATIVE_LOWEST = 2.0 ** (-ZERO / STEPS_PER_OCTAVE)


def norm_budget(dtype: torch.dtype | None) -> float:
    """The largest norm a decoded vector may have in ``dtype`` (None: the widest any supported dtype allows)."""
    return FP16_MAX if dtype == torch.float16 else WIDE_BUDGET


def variance_floor(variance: torch.Tensor) -> torch.Tensor:
    """Per component, the smallest variance the decoder uses as given: ``(1e-6 * max sigma + 1e-8)^2`` of its head
    (``variance`` [..., r]); calibration raises smaller eigenvalues to it, so what a preset stores is what decodes."""
    sigma = variance.clamp_min(0).sqrt().amax(-1, keepdim=True)
    return (sigma * SIGMA_FLOOR_REL + SIGMA_FLOOR_ABS).pow(2).expand_as(variance)


@dataclass
class StreamBasis:
    """``mean``: [H, d]; ``basis``: [H, d, r] orthonormal columns ordered by decreasing variance;
    ``variance``: [H, r], the calibrated variance of each component (eigenvalues); ``norm_median``: [H], the
    median length of the stream's vectors on calibration text, what a codec's ``secondary_sinks`` threshold is a
    fraction of (values only; None where the codec keeps no secondary sinks)."""

    mean: torch.Tensor
    basis: torch.Tensor
    variance: torch.Tensor
    norm_median: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.basis.shape[-1]

    def truncated(self, rank: int) -> "StreamBasis":
        return StreamBasis(self.mean, self.basis[..., :rank].contiguous(), self.variance[..., :rank].contiguous(),
                           self.norm_median)

    def check(self, where: str, heads: int, head_dim: int, rank: int) -> None:
        """Raise :class:`CodecError` if shapes disagree with the model or the codec, or values are unusable."""
        want = {"mean": (heads, head_dim), "basis": (heads, head_dim, rank), "variance": (heads, rank)}
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if name == "basis" and got[:2] == shape[:2] and got[2] >= rank:
                continue
            if name == "variance" and got[0] == heads and got[1] >= rank:
                continue
            if got != shape:
                raise CodecError(
                    f"{where}: {name} is {'x'.join(map(str, got))} but the model and codec need "
                    f"{'x'.join(map(str, shape))} (heads={heads}, head_dim={head_dim}, rank={rank}); "
                    "fix: use bases fitted for this model and codec"
                )
        if self.norm_median is not None and (tuple(self.norm_median.shape) != (heads,) or not
                                             (torch.isfinite(self.norm_median) & (self.norm_median > 0)).all()):
            raise CodecError(f"{where}: norm_median must hold one finite, positive length per head ({heads}); fix: "
                             "re-run calibration")
        for name in want:
            if not torch.isfinite(getattr(self, name)).all():
                raise CodecError(f"{where}: {name} contains NaN or Inf; fix: re-run calibration")
        if self.variance.numel() and self.variance.min().item() < 0:
            raise CodecError(f"{where}: variance has a negative value ({self.variance.min().item():.3g}); a variance "
                             "is >= 0; fix: re-run calibration")
        var = self.variance[..., :rank].double()
        short = var < variance_floor(var) * (1 - 1e-5)
        if short.any():
            h, j = (int(i) for i in short.nonzero()[0])
            raise CodecRangeError(
                f"{where}: variance of head {h} component {j} is {var[h, j].item():.3g}, below the decoder's floor "
                f"(1e-12 of the head's largest variance plus 1e-16: zero, denormal or an absurd ratio); fix: re-run "
                "calibration (it raises eigenvalues to the floor), or drop the component (0 bits)")
        err = orthonormality_error(self.basis[..., :rank])
        if err > ORTHONORMAL_TOL:
            raise CodecError(f"{where}: basis is not orthonormal (max |U^T U - I| = {err:.2e}); fix: re-run calibration")

    def check_range(self, where: str, stream: StreamCodec, dtype: torch.dtype | None = None,
                    exact_dtype: torch.dtype | None = None) -> None:
        """Raise :class:`CodecRangeError` if vectors decoded with ``stream`` can leave what ``dtype`` holds (the
        model's: decoded keys and values) or ``exact_dtype`` (16-bit coefficients' storage); None: the widest."""
        vector, coefficient = decode_extent(self, stream)
        for what, reach, within in (("decoded vectors", vector, dtype), ("16-bit coefficients", coefficient, exact_dtype)):
            budget = norm_budget(within)
            if reach > budget:
                if budget != FP16_MAX:
                    held = "bf16/fp32 attention survives; fix:"
                elif what == "decoded vectors":
                    held = "fp16 holds; fix: run the model in bf16 or fp32, or"
                else:  # fp32 models store 16-bit coefficients in fp16 too
                    held = "fp16 holds; fix: run the model in bf16, or build the cache with exact_dtype=torch.float32, or"
                raise CodecRangeError(
                    f"{where}: {what} can reach a norm of {reach:.3g} from the preset's mean (norm "
                    f"{self.mean.double().norm(dim=-1).max().item():.3g}) and variances, beyond {budget:.6g}, what "
                    f"{held} re-run calibration")


def decode_extent(basis: StreamBasis, stream: StreamCodec) -> tuple[float, float]:
    """``(vector, coefficient)``: over the heads, the largest norm a decoded vector of this stream, and a stored
    16-bit coefficient, can reach when the model's own key or value is zero: what the preset alone decides (a real
    vector adds at most its norm times the codec's gain below, as calibrated data must).

    A token decodes as ``x = mean + U c`` with ``c`` its rounded coefficients ``z = U^T (x - mean)``; ``U`` has
    spectral norm at most ``g = sqrt(1 + r * err)`` (``err``: its orthonormality error), so a zero vector has
    ``||z|| <= g ||mean||``. Per kept segment of ``n`` components whose levels reach ``l`` for a unit scale:

    * 16-bit: ``c = z``, stored as is (the coefficient bound);
    * a per-token scale ``s`` is at most ``2^(1/16)`` times its statistic (log8 rounds an absmax up one step) and
      ``|c_j| <= l s``: ``||c|| <= 2^(1/16) sqrt(n) ||z||`` for an absmax (``l = 1``, absmax <= ``||z||``), ``2^(1/16)
      l ||z||`` for an RMS (``= ||z|| / sqrt(n)``); a relative (log8) scale is never below ``2^-8`` times its
      reference (the RMS of the segment's deviations), so ``c`` reaches ``l sqrt(n) ref 2^-8`` whatever ``z``;
    * a channel scale: ``|c_j| <= l sigma_j`` whatever ``z``.

    By the triangle inequality over segments, ``||x|| <= ||mean|| + g (sqrt(S) + G g ||mean||)`` with ``S`` the
    sum of the squared fixed reaches (channel, log8 floor) and ``G`` the largest per-token factor (1 for 16-bit)."""
    r = stream.rank
    var = basis.variance[..., :r].double().clamp_min(0)
    mean = basis.mean.double().norm(dim=-1)
    g = math.sqrt(1 + r * orthonormality_error(basis.basis[..., :r]))
    relative = SCALE_FORMATS[stream.scale_format].relative
    fixed, gain, coefficient, start = torch.zeros_like(mean), 0.0, 0.0, 0
    for seg in stream.kept:
        part, start = slice(start, start + seg.size), start + seg.size
        if seg.bits == 16:
            gain, coefficient = max(gain, 1.0), g * mean.max().item()
            continue
        scale_name, quantizer_name = stream.code_of(seg.bits)
        scheme = SCALES[scale_name]
        top = QUANTIZERS[quantizer_name].levels(seg.bits, scheme.statistic).abs().max().item()
        if not scheme.per_token:
            fixed = fixed + top**2 * var[..., part].sum(-1)
            continue
        gain = max(gain, _SCALE_ROUNDING * top * (math.sqrt(seg.size) if scheme.statistic == "absmax" else 1.0))
        if relative:
            lowest = (var[..., part].mean(-1).sqrt() * _RELATIVE_LOWEST).clamp_max(FP16_MAX)
            fixed = fixed + seg.size * (top * lowest) ** 2
    vector = mean + g * (fixed.sqrt() + gain * g * mean)
    return (vector.max().item() if vector.numel() else 0.0), coefficient


def orthonormality_error(basis: torch.Tensor) -> float:
    """max |U^T U - I| over the heads of a ``[H, d, r]`` basis, in float64."""
    u = basis.double()
    gram = u.transpose(-1, -2) @ u
    return (gram - torch.eye(u.shape[-1], dtype=gram.dtype)).abs().max().item() if u.numel() else 0.0


def segment_rotation(size: int, seed: int = 0) -> torch.Tensor:
    """A fixed random orthogonal ``size x size`` matrix (seeded, float64 QR with a sign fix, so it is reproducible)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + size)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rotate_segments(basis: StreamBasis, stream: StreamCodec, seed: int = 0) -> StreamBasis:
    """Mix the components inside each quantized segment by a random rotation.

    Within a segment every component shares one per-token scale, so the quantization step is set by the segment's
    largest (or RMS) coefficient. Rotating the segment spreads the energy of its high-variance components evenly,
    making the coefficients near-Gaussian with equal variance: the shared step then fits all of them (measured on
    SmolLM2, int4 K+V at full rank: +1.59% PPL unrotated, +0.51% rotated). The result is still an orthonormal basis,
    so nothing changes at run time; variances are those of the rotated columns."""
    u = basis.basis[..., : stream.rank].double().clone()
    var = torch.diag_embed(basis.variance[..., : stream.rank].double())
    start = 0
    for seg in stream.kept:
        if seg.bits < 16 and seg.size > 1:
            rot = segment_rotation(seg.size, seed)
            u[..., start : start + seg.size] = u[..., start : start + seg.size] @ rot
            block = var[..., start : start + seg.size, start : start + seg.size]
            var[..., start : start + seg.size, start : start + seg.size] = rot.T @ block @ rot
        start += seg.size
    return StreamBasis(basis.mean, u.float(), torch.diagonal(var, dim1=-2, dim2=-1).float().contiguous(),
                       basis.norm_median)


class Bases(dict):
    """``{(layer, stream): StreamBasis}`` for the PCA-projected streams of a model."""

    def for_codec(self, codec: CacheCodec, shape: ModelShape) -> "Bases":
        """Check every stream the codec projects has a basis that fits, and keep only the columns it uses."""
        out = Bases()
        for i, layer in enumerate(codec.layers):
            if not layer.compressed:
                continue
            for name in STREAMS:
                stream = layer.stream(name)
                if stream.projection != "pca":
                    continue
                where = f"layer {i} {name}"
                if (i, name) not in self:
                    raise CodecError(f"{where}: the codec projects onto a PCA basis but none was given; fix: calibrate")
                basis = self[(i, name)]
                basis.check(where, shape.num_kv_heads, shape.head_dim, stream.rank)
                basis.check_range(where, stream)
                kept = basis.truncated(stream.rank)
                if name == "values" and codec.secondary_sinks and kept.norm_median is None:
                    raise CodecError(f"{where}: the codec keeps secondary sinks exact but the bases hold no median "
                                     "value length to flag them against; fix: calibrate with this kvhub")
                # a codec without secondary sinks stores no medians, so its preset saves as before they existed
                out[(i, name)] = kept if codec.secondary_sinks else replace(kept, norm_median=None)
        return out

    def check_dtype(self, codec: CacheCodec, dtype: torch.dtype, exact_dtype: torch.dtype | None = None) -> None:
        """Raise :class:`CodecRangeError` if a model in ``dtype`` would get keys or values it cannot hold from these
        bases (checked once per codec and dtypes). Loading checks only what no dtype survives; a preset whose
        vectors fit bf16 but not fp16 is refused here, when the cache is built for an fp16 model. The 16-bit
        coefficients are stored in ``exact_dtype``, by default as ``CompressedLayer`` chooses: ``dtype`` if it is
        16-bit, else fp16."""
        exact = exact_dtype or exact_dtype_for(dtype)
        memo = self.__dict__.setdefault("_in_range", set())
        if (codec, dtype, exact) in memo:
            return
        for (i, name), basis in self.items():
            basis.check_range(f"layer {i} {name}", codec.layers[i].stream(name), dtype, exact)
        memo.add((codec, dtype, exact))

    def rotated_for(self, codec: CacheCodec, shape: ModelShape, seed: int = 0) -> "Bases":
        """Calibrated (variance-ordered) bases cut to the codec's ranks with each segment rotated: what a preset stores."""
        kept = self.for_codec(codec, shape)
        return Bases({(i, name): rotate_segments(b, codec.layers[i].stream(name), seed) for (i, name), b in kept.items()})

    def nbytes(self) -> int:
        return sum(t.nbytes for b in self.values() for t in (b.mean, b.basis, b.variance, b.norm_median) if t is not None)

    def to_tensors(self, basis_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``layers.{i}.{stream}.{part}`` tensors: the basis in ``basis_dtype``, mean and variance in float32 (they
        are 1/head_dim of the bytes, and the mean is added back to every decoded vector)."""
        out = {}
        for (i, name), b in sorted(self.items()):
            out[f"layers.{i}.{name}.mean"] = b.mean.float().contiguous()
            out[f"layers.{i}.{name}.basis"] = b.basis.to(basis_dtype).contiguous()
            out[f"layers.{i}.{name}.variance"] = b.variance.float().contiguous()
            if b.norm_median is not None:
                out[f"layers.{i}.{name}.norm_median"] = b.norm_median.float().contiguous()
        return out

    def rounded(self, basis_dtype: torch.dtype) -> "Bases":
        """These bases with each basis rounded to ``basis_dtype`` (kept as float32): exactly what a preset that
        stores its basis in that dtype will load, so whatever is measured on them is what is shipped."""
        return Bases({k: replace(b, basis=b.basis.to(basis_dtype).float()) for k, b in self.items()})

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Bases":
        parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            _, i, name, part = key.split(".")
            parts.setdefault((int(i), name), {})[part] = t.float()
        return cls({k: StreamBasis(v["mean"], v["basis"], v["variance"], v.get("norm_median")) for k, v in parts.items()})
