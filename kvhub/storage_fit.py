"""Fitting the storage codec (:mod:`kvhub.storage_codec`) on calibration text: the reuse case, measured.

Each calibration window is read the way LMCache serves it: a prefix whose K/V would be stored (``prefix`` tokens)
and a continuation read against it. Per group of layers and stream, float64 moments are accumulated over the
prefix's tokens (past the window's first ``sink``, which chunks keep exact): the mean and covariance ``C`` of the
K/V as stored (rounded to fp16, as a served model hands them over), and the Fisher matrix ``G`` of the
continuation's summed next-token loss with respect to them (the covariance of its gradient, one backward pass per
window). An error ``e`` in a stored vector then costs about ``e^T G e / 2`` in loss, so the transform is the
PCA of the K/V in the metric ``A = (G + ridge * mean(eig G) * I)^(1/2)``, with ``G`` cut to its per-layer diagonal
blocks: ``encode = A U``, ``decode = U^T A^-1`` with ``U`` the eigenvectors of ``A C A``, whose eigenvalues are the
coefficients' variances (:class:`~kvhub.storage_codec.StorageGroup` stores ``U`` and the blocks of ``A``). In that metric every
coefficient's error costs the same per unit, across layers, heads and both streams, so one greedy allocation over
all of them spends a budget where it lowers the loss most. The ridge keeps directions the gradients never visited
from being dropped outright.

Budgets are named by their ratio to the fp16 chunk of ``chunk_tokens`` tokens (LMCache's default 256), with
every byte of the stored chunk counted: header, exact tokens, packed codes.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from .codec import STREAMS, ModelShape
from .integrations.chunks import HEADER_BYTES, to_chunks
from .protocol import calibration_domain
from .storage_codec import MAX_BITS, StorageCodec, StorageGroup, distortion, group_vectors
from .text import corpus_sha256, read_texts, token_windows



@dataclass
class StorageFitConfig:
    """How the storage codec is fitted. ``layers_per_group=0`` puts all layers in one group (KVTC's choice, and
    the best measured: ``benchmarks/results/storage_design.json``). ``windows_per_file``: 16 windows of each
    calibration file (144 windows on corpora/calibration, ~147k prefix tokens) instead of 4 took German, every
    form's worst corpus, from +1.51% to +0.47% at 10x and from +3.08% to +1.30% at 16x (its 74 evaluation windows,
    ``calibration_windows.py`` there): a transform over 5760 numbers per token needs that many tokens per domain."""

    ratios: tuple[float, ...] = (10.0, 16.0)
    layers_per_group: int = 0
    prefix: int = 1024
    continuation: int = 256
    windows_per_file: int = 16
    sink: int = 4
    exact: int = 1
    chunk_tokens: int = 256
    ridge: float = 1e-2


class _GroupMoments:
    """Float64 moments of one stream of a group of ``layers`` layers, ``width`` numbers per layer and token: the
    K/V's sum and outer products over the whole group, the gradient's outer products per layer (the Fisher matrix's
    diagonal blocks: measured better than the full matrix, worst corpus +1.22% against +2.14% at 10x on the design
    windows, ``benchmarks/results/storage_design.json``)."""

    def __init__(self, layers: int, width: int) -> None:
        self.count = 0
        self.sum = torch.zeros(layers * width, dtype=torch.float64)
        self.outer = torch.zeros(layers * width, layers * width, dtype=torch.float64)
        self.grad_sum = torch.zeros(layers, width, dtype=torch.float64)
        self.fisher = torch.zeros(layers, width, width, dtype=torch.float64)

    def add(self, x: torch.Tensor, g: torch.Tensor, weight: float = 1.0) -> None:
        """x, g: [tokens, layers * width]; each token counts ``weight`` times."""
        x = x.double()
        g = g.double().reshape(g.shape[0], *self.fisher.shape[:2]).transpose(0, 1)  # [l, T, W]
        self.count += weight * x.shape[0]
        self.sum += weight * x.sum(0)
        self.outer += weight * (x.T @ x)
        self.grad_sum += weight * g.sum(1)
        self.fisher += weight * (g.transpose(1, 2) @ g)

    def transform(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, basis [F, F], whiten [l, W, W], variance [F])`` of the Fisher-metric PCA (module docstring)."""
        mean = self.sum / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        g_mean = self.grad_sum / self.count  # the gradients' covariance, as the design search measured it
        ev, q = torch.linalg.eigh(self.fisher / self.count - g_mean[:, :, None] * g_mean[:, None, :])  # per layer
        ev = ev.clamp_min(0)
        ev = ev + ridge * ev.mean()
        whiten = (q * ev.sqrt()[:, None, :]) @ q.transpose(1, 2)  # per-layer blocks of A
        a = torch.block_diag(*whiten)
        var, u = torch.linalg.eigh(a @ cov @ a)
        var, u = var.flip(0).clamp_min(0), u.flip(1)
        signs = torch.sign(u[u.abs().argmax(0), torch.arange(u.shape[1])])  # the same data gives the same transform
        u = u * torch.where(signs == 0, 1.0, signs)
        return mean, u.T, whiten, var


def _groups(num_layers: int, per_group: int) -> list[tuple[int, ...]]:
    per_group = per_group or num_layers
    return [tuple(range(s, min(s + per_group, num_layers))) for s in range(0, num_layers, per_group)]


def _prefix_kv_and_grads(model, ids: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2, L, P, H*d]`` prefix K/V (fp16-rounded) and the continuation loss's gradient with respect to them."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :prefix], cache=cache, use_cache=True)
    leaves = [t.detach().clone().requires_grad_(True) for la in cache.layers for t in (la.keys, la.values)]
    replay = DynamicCache(config=model.config)
    for i in range(len(cache.layers)):
        replay.update(leaves[2 * i], leaves[2 * i + 1], i)
    logits = model(input_ids=ids[:, prefix:], cache=replay, use_cache=True).logits[0, :-1]
    loss = F.cross_entropy(logits.float(), ids[0, prefix + 1 :], reduction="sum")
    grads = torch.autograd.grad(loss, leaves)

    kv = to_chunks([t.detach() for t in leaves[0::2]], [t.detach() for t in leaves[1::2]], prefix)[0]
    return kv.half().float(), to_chunks(list(grads[0::2]), list(grads[1::2]), prefix)[0].float()


def domain_weights(domains: list[str]) -> list[float]:
    """Per window, the weight that makes every calibration domain count the same, however many windows (files) it
    has: the four novels of ``corpora/calibration`` weigh one domain, not four. Measured on the design windows
    (``benchmarks/results/storage_design.json``): against weighting every file alike, the worst corpus (German) went
    from +1.82% to +1.33% at 10x, the mean from +0.77% to +0.49%."""
    return [len(domains) / (len(set(domains)) * domains.count(d)) for d in domains]


def collect_moments(model, windows: list[torch.Tensor], shape: ModelShape, config: StorageFitConfig,
                    progress: bool = True, weights: list[float] | None = None
                    ) -> dict[tuple[str, tuple[int, ...]], _GroupMoments]:
    """The moments of every group over ``windows``, window ``i`` counted ``weights[i]`` times (default: once)."""
    groups = _groups(shape.num_layers, config.layers_per_group)
    width = shape.num_kv_heads * shape.head_dim
    moments = {(s, g): _GroupMoments(len(g), width) for s in STREAMS for g in groups}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = weights or [1.0] * len(windows)
    for ids, weight in tqdm(list(zip(windows, weights)), desc="storage codec: calibration windows",
                            disable=not progress):
        kv, grad = _prefix_kv_and_grads(model, ids, config.prefix)
        for (stream, layers), m in moments.items():
            m.add(group_vectors(kv, stream, layers)[config.sink :], group_vectors(grad, stream, layers)[config.sink :],
                  weight)
    return moments


def chunk_budget_bits(shape: ModelShape, ratio: float, config: StorageFitConfig, groups: int) -> int:
    """Code bits per quantized token that keep a ``chunk_tokens`` chunk ``ratio`` times smaller than fp16, with the
    header, the exact tokens and up to one byte of padding per packed run counted."""
    elems = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim
    fp16 = config.chunk_tokens * elems * 2
    fixed = HEADER_BYTES + config.exact * elems * 2 + 2 * groups * MAX_BITS
    return int((fp16 / ratio - fixed) * 8 // (config.chunk_tokens - config.exact))


def allocate(variances: list[torch.Tensor], budget_bits: int) -> list[torch.Tensor]:
    """Greedy rate-distortion allocation: each bit goes to the coefficient whose loss it lowers most,
    ``variance * (D(b) - D(b+1))``; optimal for convex distortion curves such as :func:`distortion`'s."""
    bits = [torch.zeros(v.numel(), dtype=torch.long) for v in variances]
    gain = [distortion(b) - distortion(b + 1) for b in range(MAX_BITS)]
    heap = [(-float(v) * gain[0], gi, i) for gi, var in enumerate(variances) for i, v in enumerate(var.tolist())]
    heapq.heapify(heap)
    used = 0
    while used < budget_bits and heap:
        _, gi, i = heapq.heappop(heap)
        b = int(bits[gi][i]) + 1
        bits[gi][i] = b
        used += 1
        if b < MAX_BITS:
            heapq.heappush(heap, (-float(variances[gi][i]) * gain[b], gi, i))
    return bits


def build_codec(moments: dict[tuple[str, tuple[int, ...]], _GroupMoments], shape: ModelShape,
                config: StorageFitConfig) -> StorageCodec:
    """Transforms from the moments, one allocation per ratio, each group cut to the coefficients some budget uses."""
    fitted = [(stream, layers, *m.transform(config.ridge)) for (stream, layers), m in moments.items()]
    variances = [f[5] for f in fitted]
    budgets = {f"{r:g}x": allocate(variances, chunk_budget_bits(shape, r, config, len(fitted))) for r in config.ratios}
    groups, cut = [], {}
    for gi, (stream, layers, mean, basis, whiten, var) in enumerate(fitted):
        k = max(int((b[gi] > 0).nonzero().max()) + 1 if (b[gi] > 0).any() else 0 for b in budgets.values())
        # the stored (fp16) basis: the in-memory codec is the one a saved preset loads, bit for bit
        groups.append(StorageGroup(stream, layers, mean.float(), basis[:k].half().float(), whiten.float(),
                                   var[:k].sqrt().float()))
        cut[gi] = k
    budgets = {name: [b[gi][: cut[gi]] for gi in range(len(groups))] for name, b in budgets.items()}
    return StorageCodec(groups, budgets, config.exact, shape.num_layers, shape.num_kv_heads, shape.head_dim)


def fit_storage_codec(model, windows: list[torch.Tensor], shape: ModelShape, config: StorageFitConfig,
                      progress: bool = True, weights: list[float] | None = None) -> StorageCodec:
    """Fit the storage codec on calibration ``windows`` (``[1, prefix + continuation]`` token ids each, window ``i``
    weighing ``weights[i]``)."""
    return build_codec(collect_moments(model, windows, shape, config, progress, weights), shape, config)


def storage_section(codec: StorageCodec, config: StorageFitConfig, corpus_sha256: str, windows: int,
                    seconds: float, domains: list[str]) -> dict:
    """The preset config's ``storage`` section for ``codec``: its layout, each budget's ratio to the fp16 chunk of
    ``chunk_tokens`` tokens (every byte counted), and how it was fitted."""
    elems = 2 * codec.num_layers * codec.num_kv_heads * codec.head_dim
    fp16 = config.chunk_tokens * elems * 2
    section = codec.layout()
    for name, budget in section["budgets"].items():
        budget["ratio_vs_fp16_chunk"] = round(fp16 / codec.chunk_bytes(config.chunk_tokens, name, HEADER_BYTES), 3)
    return {**section, "chunk_tokens": config.chunk_tokens, "fit": {
        "corpus_sha256": corpus_sha256, "windows": windows, "prefix_tokens": config.prefix,
        "continuation_tokens": config.continuation, "domains_weighted_alike": domains,
        "layers_per_group": config.layers_per_group,
        "ridge": config.ridge, "seconds": round(seconds, 1)}}


def fit_preset_storage(preset: Any, model, tokenizer, calibration: list[str | Path], config: StorageFitConfig,
                       progress: bool = True) -> Any:
    """Fit the storage codec for ``preset``'s model on the ``calibration`` files (``windows_per_file`` windows of
    each, spread over it; every domain weighing the same, :func:`domain_weights`) and attach it to the preset; save
    it with ``save_pretrained``."""
    windows, domains = [], []
    for name, text in read_texts(calibration):
        picked = token_windows(tokenizer, text, config.prefix + config.continuation, config.windows_per_file,
                               where="spread")
        windows += picked
        domains += [calibration_domain(name)] * len(picked)
    start = time.time()
    codec = fit_storage_codec(model, windows, preset.shape, config, progress, domain_weights(domains))
    section = storage_section(codec, config, corpus_sha256(calibration), len(windows), time.time() - start,
                              sorted(set(domains)))
    return preset.with_storage(codec, section)


__all__ = ["StorageFitConfig", "fit_storage_codec", "fit_preset_storage", "allocate", "chunk_budget_bits", "build_codec", "collect_moments",
           "domain_weights", "storage_section"]
