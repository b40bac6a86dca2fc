"""Vector codes: one byte codes a group of components jointly, as one of 256 codewords of a Gaussian codebook.

A ``b``-bit segment packs ``8/b`` components per byte (:mod:`kvhub.layout`); a vector code spends the same byte on
the same ``8/b`` consecutive components, but picks the nearest of 256 points in that many dimensions instead of one
level per component. Scalar levels put every component on a grid of ``2**b`` values whatever the others are; a
codebook can place its 256 points where Gaussian vectors are dense. On unit Gaussian vectors (the rotated PCA
coefficients over their per-token RMS, as for Lloyd-Max), the packaged codebooks' MSE is about 18% below
Lloyd-Max's at 2 bits (4-D codewords) and 17% below at 4 bits (2-D codewords): ``benchmarks/vq_codebooks.py``
fits them (k-means on Gaussian samples) and measures both; a test checks the MSE on fresh samples.

Decoding costs what tabled scalar levels cost: a stored byte is looked up in a ``[256, 8/b]`` table that gives its
components at once (:class:`kvhub.plan.SegmentPlan` ``byte_table``). Encoding compares each group with 256
codewords, in blocks of tokens so the distances stay within :data:`ENCODE_BLOCK_BYTES`.

The codebooks are a packaged file, not refitted at import: a stored code decodes only with the very codebook that
made it (KV at rest, chunks in LMCache), and k-means is not bit-reproducible across platforms and versions. For
the same reason a new codebook needs a new quantizer name (a test pins this file's digest)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..quant import CODES_PER_BYTE
from .base import Quantizer, Statistic

CODEBOOK_FILE = Path(__file__).with_name("gaussian_vq.safetensors")
# Distances of one encode block, bytes (a 7B model's 32k-token prefill would otherwise need GBs for one layer).
ENCODE_BLOCK_BYTES = 64 << 20


def codebook_name(bits: int) -> str:
    return f"bits{bits}"


@lru_cache(maxsize=None)
def codebooks() -> dict[int, torch.Tensor]:
    """``{bits: [256, 8 // bits] float32}`` as packaged, each bounded before use."""
    stored, out = load_file(str(CODEBOOK_FILE)), {}
    for bits, per in CODES_PER_BYTE.items():
        if per == 1:
            continue
        book = stored.get(codebook_name(bits))
        if book is None or tuple(book.shape) != (256, per) or not torch.isfinite(book).all():
            raise ValueError(f"{CODEBOOK_FILE} lacks a finite [256, {per}] codebook for {bits} bits; fix: reinstall "
                             "kvhub or rerun benchmarks/vq_codebooks.py")
        out[bits] = book.float()
    return out


@lru_cache(maxsize=None)
def codebook_sha256() -> bytes:
    """sha256 of the packaged codebook file: what chunks of vector codes at rest are tied to."""
    return hashlib.sha256(CODEBOOK_FILE.read_bytes()).digest()


class VectorQuantizer(Quantizer):
    name = "vq"
    statistics = ("deviation",)  # the codebooks are those of unit Gaussian vectors: the scale must be a deviation

    def _book(self, bits: int) -> torch.Tensor:
        if bits not in codebooks():
            raise ValueError(f"vector codes exist for {sorted(codebooks())} bits, not {bits}")
        return codebooks()[bits]

    def levels(self, bits: int, statistic: Statistic) -> torch.Tensor:
        """The distinct component values the codebook can decode to (a vector code has no per-component levels;
        this is what bounds a decoded component)."""
        return self._book(bits).flatten().unique().double()

    def byte_table(self, bits: int, statistic: Statistic) -> torch.Tensor:
        return self._book(bits)

    def fingerprint(self) -> bytes:
        return codebook_sha256()

    def encode_packed(self, z: torch.Tensor, scale: torch.Tensor, bits: int, statistic: Statistic) -> torch.Tensor:
        book = self._book(bits).to(z.device)
        norms = book.pow(2).sum(-1)
        groups = (z / scale).unflatten(-1, (-1, book.shape[1]))  # [..., n, groups, per]
        per_token = groups[..., :1, :, 0].numel() * book.shape[0] * 4  # distance bytes of one token
        block = max(1, ENCODE_BLOCK_BYTES // max(per_token, 1))
        codes = torch.empty(groups.shape[:-1], dtype=torch.uint8, device=z.device)
        for t in range(0, groups.shape[-3], block):
            # nearest codeword: argmin |g - c|^2 = argmax 2 g.c - |c|^2
            codes[..., t : t + block, :] = (2 * groups[..., t : t + block, :, :] @ book.T - norms).argmax(-1)
        return codes
