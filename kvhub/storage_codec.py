"""The storage codec: KV at rest, in a form no attention kernel reads, several times smaller than the attention form.

A KV chunk stored in LMCache is decoded once, when it is prefetched, and never attended to in its stored form. So
its codec need not keep heads and layers apart, nor store a scale per token, as the attention codec must (a decode
step reads one head of one layer at a time). Following KVTC (arXiv 2511.01815), each stream (keys, values) of a
*group of layers* is one vector per token: every layer's heads concatenated, 5760 numbers per token and stream on
SmolLM2 when the group is all 30 layers. Its transform and bits are fitted once per model
(:mod:`kvhub.storage_fit`):

* **Transform.** A linear map ``encode`` ``[F, k]`` with its synthesis ``decode`` ``[k, F]``, fitted so that the
  error it leaves is measured in the loss's own metric (the Fisher matrix of the next-token loss with respect to
  the cached K/V, from calibration gradients), not in plain squared error: PCA in the Fisher-whitened space. Cross
  layer and cross head redundancy is what the attention form cannot use; the metric is what makes the bits go where
  attention reads them (`benchmarks/results/storage_design.json` measures both).
* **Codes.** Each coefficient ``k`` of a token is ``c_k / sigma_k`` quantized with a fixed number of bits ``b_k``
  (0 to 8) chosen per *budget* by a greedy rate-distortion allocation (optimal for these convex distortion curves),
  Lloyd-Max levels of a unit Gaussian for 1 to 4 bits, the MSE-optimal uniform step for 5 to 8. No per-token scale
  is stored. A coefficient with 0 bits decodes to 0 (its mean).
* **Exact tokens.** The first ``exact`` tokens of every chunk are kept at 16 bits, as the attention form does: a
  chunk has no position, and the one holding position 0 carries the attention sink.

The size of an encoded chunk is a function of its shape, the budget and the codec only (LMCache's ``fs`` adapter
allocates from the shape before it sees the data).

Bit packing: the codes of the coefficients that have ``b`` bits are packed ``b`` bits each, token-major, little-endian
bit order, one run per group, stream and bit width; the run for ``n`` codes takes ``ceil(n * b / 8)`` bytes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .codec import STREAMS
from .errors import CodecError
from .quantizers.lloyd_max import gaussian_levels

FORMAT = "kvhub-storage-codec"
FORMAT_VERSION = 1
MAX_BITS = 8
LLOYD_MAX_BITS = 4  # Lloyd's iteration settles in well under a second up to 16 levels; uniform levels above


@lru_cache(maxsize=1)
def _gaussian_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Points and probability weights of a unit Gaussian on a fine grid over +-12 sigma, for exact-enough integrals."""
    z = torch.linspace(-12, 12, 480_001, dtype=torch.float64)
    w = torch.exp(-z**2 / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    return z, w


def _uniform_mse(bits: int, step: float) -> float:
    z, w = _gaussian_grid()
    n = 2**bits
    q = torch.round(z / step + (n - 1) / 2).clamp(0, n - 1)
    return float(((q - (n - 1) / 2) * step - z).pow(2).mul(w).sum())


def _best_uniform_step(bits: int) -> float:
    """The MSE-optimal uniform step for a unit Gaussian (golden-section search; Max 1960 tabulates a few)."""
    lo, hi = 0.0, 2.0
    g = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if _uniform_mse(bits, a) < _uniform_mse(bits, b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


@lru_cache(maxsize=None)
def levels(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels [2**bits], thresholds [2**bits - 1])`` of the ``bits``-bit quantizer of a unit Gaussian, float32."""
    if not 1 <= bits <= MAX_BITS:
        raise CodecError(f"the storage codec quantizes with 1 to {MAX_BITS} bits, not {bits}")
    if bits <= LLOYD_MAX_BITS:
        lv, th = gaussian_levels(bits)
    else:
        n = 2**bits
        lv = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * _best_uniform_step(bits)
        th = (lv[1:] + lv[:-1]) / 2
    return lv.float(), th.float()


@lru_cache(maxsize=None)
def distortion(bits: int) -> float:
    """Mean squared error of :func:`levels` on a unit Gaussian (1.0 at 0 bits: the coefficient decodes to 0)."""
    if bits == 0:
        return 1.0
    lv, th = (t.double() for t in levels(bits))
    z, w = _gaussian_grid()
    return float((lv[torch.bucketize(z, th)] - z).pow(2).mul(w).sum())


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (uint8, each below ``2**bits``) as a little-endian bit stream of ``ceil(numel * bits / 8)`` bytes."""
    flat = ((codes.reshape(-1, 1).to(torch.int32) >> torch.arange(bits, device=codes.device)) & 1).reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << torch.arange(8, device=codes.device)).sum(1).to(torch.uint8)


def unpack_bits(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` codes of ``bits`` bits (int64)."""
    flat = ((data.reshape(-1, 1).to(torch.int32) >> torch.arange(8, device=data.device)) & 1).reshape(-1)
    return (flat[: count * bits].view(count, bits) << torch.arange(bits, device=data.device)).sum(1)


def group_vectors(kv: torch.Tensor, stream: str, layers: tuple[int, ...]) -> torch.Tensor:
    """``kv`` [2, L, T, H*d] -> one stream of a group of layers as vectors [T, len(layers) * H*d], layer-major: the
    order every storage transform (and its fit) uses."""
    x = kv[STREAMS.index(stream), list(layers)]  # [l, T, H*d]
    return x.permute(1, 0, 2).reshape(x.shape[1], -1)


def packed_bytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


@dataclass
class StorageGroup:
    """The transform of one stream of a group of layers: ``F = len(layers) * heads * head_dim`` numbers per token,
    ``k`` kept coefficients. ``whiten`` holds, per layer, the ``[H*d, H*d]`` block of the loss metric's square root
    ``A`` (:mod:`kvhub.storage_fit`); ``basis`` [k, F] the orthonormal principal directions in the whitened space,
    stored in fp16. An int8 basis (a scale per row; fitted then with the gradients' second moment instead of their
    covariance) measured +2.66% mean perplexity at 10x on the design windows against +0.51% for this form: its rows'
    ~1% error is larger than the quantization error of the 8-bit coefficients, which carry the most variance.
    The maps follow: ``encode = A basis^T`` [F, k] and ``decode = basis A^-1`` [k, F]. (Storing ``decode`` alone
    would put quantization error where ``A^-1`` is large, the directions the loss ignores, and amplify it where
    ``A`` is large: measured here, the tiny model's error grew past the signal.)"""

    stream: str
    layers: tuple[int, ...]
    mean: torch.Tensor  # [F]
    basis: torch.Tensor  # [k, F]
    whiten: torch.Tensor  # [len(layers), H*d, H*d], symmetric positive definite
    sigma: torch.Tensor  # [k], the deviation of each coefficient on the calibration text

    def __post_init__(self) -> None:
        blocks, width, _ = self.whiten.shape
        if self.basis.shape[1] != blocks * width:
            raise CodecError(f"storage group {self.name()}: the basis has {self.basis.shape[1]} features, the metric "
                             f"{blocks} x {width}; fix: re-fit the storage codec")
        u = self.basis.T.reshape(blocks, width, -1)  # [l, W, k]
        try:
            inverse = torch.linalg.inv(self.whiten.double()).float()
        except torch.linalg.LinAlgError:
            raise CodecError(f"storage group {self.name()}: a metric block is singular; fix: re-fit the storage "
                             "codec") from None
        self.encode = (self.whiten @ u).reshape(blocks * width, -1)  # [F, k]
        self.decode = (inverse @ u).reshape(blocks * width, -1).T.contiguous()  # [k, F] (A^-1 is symmetric)

    @property
    def rank(self) -> int:
        return self.sigma.numel()

    def name(self) -> str:
        return f"{self.stream}.{self.layers[0]}-{self.layers[-1]}"


@dataclass(frozen=True)
class _GroupPlan:
    group: StorageGroup
    encode: torch.Tensor  # [F, n]: kept columns by bit width, divided by sigma
    decode: torch.Tensor  # [n, F]: the same rows, times sigma
    mean: torch.Tensor
    runs: list[tuple[int, int, int]]  # (bits, first, end) slices of the n coefficients


class StorageCodec:
    """The fitted transforms of every group and, per named budget, the bits of every kept coefficient."""

    def __init__(self, groups: list[StorageGroup], budgets: dict[str, list[torch.Tensor]], exact: int,
                 num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        self.groups = groups
        self.budgets = budgets
        self.exact = exact
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self._check()
        self._plans: dict[tuple[str, str], list[_GroupPlan]] = {}
        self._digest: bytes | None = None

    def _check(self) -> None:
        width = self.num_kv_heads * self.head_dim
        for stream in STREAMS:
            covered = sorted(i for g in self.groups if g.stream == stream for i in g.layers)
            if covered != list(range(self.num_layers)):
                raise CodecError(f"the storage codec's {stream} groups cover layers {covered[:8]}..., not each of the "
                                 f"{self.num_layers} layers once; fix: re-fit it with kvhub fit-storage")
        for g in self.groups:
            f = len(g.layers) * width
            shapes = (tuple(g.mean.shape), tuple(g.basis.shape), tuple(g.whiten.shape), tuple(g.sigma.shape))
            if shapes != ((f,), (g.rank, f), (len(g.layers), width, width), (g.rank,)):
                raise CodecError(f"storage group {g.name()}: tensor shapes {shapes} do not fit {f} features; fix: "
                                 "re-fit the storage codec for this model")
        for g in self.groups:
            if not all(bool(t.isfinite().all()) for t in (g.mean, g.basis, g.whiten, g.sigma, g.encode, g.decode)):
                raise CodecError(f"storage group {g.name()}: a tensor holds NaN or inf, or the metric is "
                                 "ill-conditioned past float32; fix: re-fit the storage codec")
        for name, bits in self.budgets.items():
            if len(bits) != len(self.groups) or any(b.shape != (g.rank,) for b, g in zip(bits, self.groups)):
                raise CodecError(f"storage budget '{name}' does not give one bit width per kept coefficient of every "
                                 "group; fix: re-fit the storage codec")
            if any(int(b.max()) > MAX_BITS for b in bits if b.numel()):
                raise CodecError(f"storage budget '{name}' asks for more than {MAX_BITS} bits; fix: re-fit it")

    # --- sizes ------------------------------------------------------------------------------------------------
    def budget(self, name: str) -> list[torch.Tensor]:
        if name not in self.budgets:
            raise CodecError(f"the storage codec has no budget '{name}'; fix: pick one of {sorted(self.budgets)}")
        return self.budgets[name]

    def code_bytes(self, tokens: int, budget: str) -> int:
        """Bytes of the packed codes of ``tokens`` quantized tokens."""
        return sum(self.run_sizes(tokens, budget))

    def chunk_bytes(self, tokens: int, budget: str, header_bytes: int) -> int:
        """Every byte of a stored chunk of ``tokens`` tokens: header, the exact tokens at 16 bits, packed codes."""
        e = min(self.exact, tokens)
        return header_bytes + 2 * self.num_layers * e * self.num_kv_heads * self.head_dim * 2 + self.code_bytes(tokens - e, budget)

    def bits_per_token(self, budget: str) -> int:
        return sum(int(b.sum()) for b in self.budget(budget))

    # --- coding -----------------------------------------------------------------------------------------------
    def _plan(self, budget: str, device: torch.device) -> list[_GroupPlan]:
        """Per group, for ``budget`` on ``device``: the kept coefficients ordered by bit width (so each width's codes
        are one contiguous slice), with ``1 / sigma`` folded into the analysis map and ``sigma`` into the synthesis.
        Built once per budget and device: a call then runs two matmuls per group and no copies of the maps."""
        key = (budget, str(device))
        if key not in self._plans:
            plans = []
            for g, bits in zip(self.groups, self.budget(budget)):
                order = torch.sort(bits, stable=True).indices
                order = order[bits[order] > 0]
                widths = torch.bincount(bits[order], minlength=MAX_BITS + 1).tolist()
                runs, start = [], 0
                for b in range(1, MAX_BITS + 1):
                    if widths[b]:
                        runs.append((b, start, start + widths[b]))
                        start += widths[b]
                sigma = g.sigma[order]
                plans.append(_GroupPlan(g, (g.encode[:, order] / sigma).to(device),
                                        (g.decode[order] * sigma[:, None]).to(device), g.mean.to(device), runs))
            self._plans[key] = plans
        return self._plans[key]

    def encode(self, kv: torch.Tensor, budget: str) -> list[torch.Tensor]:
        """The packed code runs (uint8) of ``kv`` [2, L, T, H*d]: per group, per bit width 1..8 that it uses; on
        ``kv``'s device."""
        out = []
        for plan in self._plan(budget, kv.device):
            z = (group_vectors(kv, plan.group.stream, plan.group.layers).float() - plan.mean) @ plan.encode
            for b, lo, hi in plan.runs:
                codes = torch.bucketize(z[:, lo:hi].contiguous(), levels(b)[1].to(z.device))
                out.append(pack_bits(codes.to(torch.uint8), b))
        return out

    def decode(self, runs: list[torch.Tensor], tokens: int, out: torch.Tensor, budget: str) -> None:
        """Write the K/V that :meth:`encode`'s ``runs`` hold into ``out`` [2, L, tokens, H*d] (on its device)."""
        it = iter(runs)
        width = self.num_kv_heads * self.head_dim
        for plan in self._plan(budget, out.device):
            z = torch.empty(tokens, plan.decode.shape[0], device=out.device)
            for b, lo, hi in plan.runs:
                codes = unpack_bits(next(it).to(out.device), b, tokens * (hi - lo)).view(tokens, hi - lo)
                z[:, lo:hi] = levels(b)[0].to(out.device)[codes]
            x = z @ plan.decode + plan.mean
            g = plan.group
            out[STREAMS.index(g.stream), list(g.layers)] = x.view(tokens, len(g.layers), width).permute(1, 0, 2).to(out.dtype)

    def run_sizes(self, tokens: int, budget: str) -> list[int]:
        """Byte length of each run :meth:`encode` writes, in order."""
        sizes = []
        for bits in self.budget(budget):
            for b in range(1, MAX_BITS + 1):
                n = int((bits == b).sum())
                if n:
                    sizes.append(packed_bytes(n * tokens, b))
        return sizes

    # --- files ------------------------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, g in enumerate(self.groups):
            out |= {f"groups.{i}.mean": g.mean.float(), f"groups.{i}.basis": g.basis.half(),
                    f"groups.{i}.whiten": g.whiten.float(), f"groups.{i}.sigma": g.sigma.float()}
            for name, bits in self.budgets.items():
                out[f"budgets.{name}.{i}"] = bits[i].to(torch.uint8)
        return out

    def layout(self) -> dict:
        """The JSON that goes with :meth:`to_tensors` (the config's ``storage`` section, less the file record)."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "exact_tokens": self.exact,
            "groups": [{"stream": g.stream, "layers": list(g.layers), "rank": g.rank} for g in self.groups],
            "budgets": {name: {"bits_per_token": self.bits_per_token(name)} for name in self.budgets},
        }

    @classmethod
    def from_tensors(cls, layout: dict, tensors: dict[str, torch.Tensor], num_layers: int, num_kv_heads: int,
                     head_dim: int) -> "StorageCodec":
        groups = []
        for i, spec in enumerate(layout["groups"]):
            t = {p: tensors[f"groups.{i}.{p}"].float() for p in ("mean", "basis", "whiten", "sigma")}
            groups.append(StorageGroup(spec["stream"], tuple(spec["layers"]), **t))
        budgets = {name: [tensors[f"budgets.{name}.{i}"].long() for i in range(len(groups))] for name in layout["budgets"]}
        return cls(groups, budgets, int(layout["exact_tokens"]), num_layers, num_kv_heads, head_dim)

    def digest(self) -> bytes:
        """sha256 over the layout and every tensor's bytes: a chunk decodes only with the codec that wrote it.
        Computed once per codec (it hashes the whole basis, ~0.2 s for SmolLM2's 83 MB)."""
        if self._digest is None:
            h = hashlib.sha256(repr(sorted(self.layout().items())).encode())
            for name, t in sorted(self.to_tensors().items()):
                h.update(name.encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            self._digest = h.digest()
        return self._digest


__all__ = ["StorageCodec", "StorageGroup", "group_vectors", "levels", "distortion", "pack_bits", "unpack_bits", "FORMAT",
           "FORMAT_VERSION"]
