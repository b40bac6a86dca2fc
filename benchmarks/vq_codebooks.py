"""Fit the vector codes' Gaussian codebooks (kvhub/quantizers/gaussian_vq.safetensors) and measure them.

A byte of a ``b``-bit segment holds ``8/b`` components; a vector code makes that byte the index of one of 256
codewords in ``8/b`` dimensions (:mod:`kvhub.quantizers.vector`). The codewords are k-means (Lloyd's algorithm in
``8/b`` dimensions) on unit Gaussian samples, the distribution of rotated PCA coefficients over their RMS. The MSE
of each codebook, of Lloyd-Max's scalar levels at the same bits, and the rate-distortion bound ``2**(-2b)`` are
measured on fresh samples and written to ``benchmarks/results/vq_codebooks.json``.

    python benchmarks/vq_codebooks.py            # measures the packaged codebooks
    python benchmarks/vq_codebooks.py --refit    # ~1 min on 2 cores: fits them again and rewrites the file

Refitting changes what every stored vector code decodes to (presets' caches, KV at rest, LMCache chunks): a new
codebook needs a new quantizer name, and ``tests/test_vector_codes.py`` pins the packaged file's digest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvhub.quantizers.lloyd_max import gaussian_levels
from kvhub.quantizers.vector import CODEBOOK_FILE, codebook_name, codebooks

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "vq_codebooks.json"
SAMPLES, ITERATIONS, SEED, TEST_SEED = 500_000, 80, 0, 1


def kmeans(dim: int, k: int = 256) -> torch.Tensor:
    """Lloyd's algorithm on ``SAMPLES`` unit Gaussian vectors, started from the first ``k`` samples."""
    x = torch.randn(SAMPLES, dim, generator=torch.Generator().manual_seed(SEED))
    c = x[:k].clone()
    for _ in range(ITERATIONS):
        nearest = torch.cdist(x, c).argmin(1)
        count = torch.bincount(nearest, minlength=k)
        if (count == 0).any():
            raise RuntimeError(f"k-means in {dim} dimensions left a codeword with no sample; change SEED")
        c = torch.zeros_like(c).index_add_(0, nearest, x) / count[:, None]
    return c


def mse(book: torch.Tensor) -> float:
    x = torch.randn(SAMPLES, book.shape[1], generator=torch.Generator().manual_seed(TEST_SEED))
    return (x - book[torch.cdist(x, book).argmin(1)]).pow(2).mean().item()


def scalar_mse(bits: int) -> float:
    levels, thresholds = (t.float() for t in gaussian_levels(bits))
    x = torch.randn(SAMPLES, generator=torch.Generator().manual_seed(TEST_SEED))
    return (x - levels[(x[:, None] > thresholds).sum(-1)]).pow(2).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--refit", action="store_true", help="fit the codebooks again and rewrite the packaged file")
    args = parser.parse_args()
    if args.refit:
        save_file({codebook_name(b): kmeans(8 // b).contiguous() for b in (2, 4)}, str(CODEBOOK_FILE))
        codebooks.cache_clear()
    rows = []
    for bits, book in sorted(codebooks().items()):
        row = {"bits": bits, "dimensions": book.shape[1], "codewords": book.shape[0], "mse_vq": round(mse(book), 6),
               "mse_lloyd_max": round(scalar_mse(bits), 6), "mse_rate_distortion_bound": 2.0 ** (-2 * bits)}
        row["vq_vs_lloyd_max_pct"] = round(100 * (row["mse_vq"] / row["mse_lloyd_max"] - 1), 2)
        rows.append(row)
        print(row)
    OUT.write_text(json.dumps({"samples": SAMPLES, "iterations": ITERATIONS, "fit_seed": SEED, "test_seed": TEST_SEED,
                               "codebooks": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
