"""Fitting the PCA bases on calibration text.

The model reads calibration windows; a recording cache sees every layer's keys (after RoPE, as they are cached) and
values and accumulates, per layer, stream and KV head, the sum and the outer-product sum in float64: memory is
independent of the token count but for one float per value vector (the lengths whose median a codec's
``secondary_sinks`` threshold is a fraction of), so 100k+ calibration tokens cost little more than time. The first ``sink``
positions of each window are left out: attention sinks are stored exactly and would only distort the basis. For
keys coded before RoPE (:mod:`kvhub.rope`) the keys are un-turned by their positions first: that is what the cache
will code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache
from tqdm.auto import tqdm

from .bases import Bases, StreamBasis, variance_floor
from .codec import ModelShape
from .passthrough import PassThroughLayer
from .rope import RotaryFrame


class _Moments:
    def __init__(self, heads: int, dim: int, device) -> None:
        self.count = 0
        self.sum = torch.zeros(heads, dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(heads, dim, dim, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """x: [B, H, T, d]."""
        x = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])
        self.count += x.shape[1]
        self.sum += x.sum(1)
        self.outer += x.transpose(1, 2) @ x

    def basis(self) -> StreamBasis:
        mean = self.sum / self.count
        cov = self.outer / self.count - mean[:, :, None] * mean[:, None, :]
        eigvals, eigvecs = torch.linalg.eigh(cov.cpu())
        eigvals, eigvecs = eigvals.flip(-1).clamp_min(0), eigvecs.flip(-1)
        eigvals = torch.maximum(eigvals, variance_floor(eigvals))  # a direction with no spread decodes at the floor
        # Fix each eigenvector's sign (largest entry positive) so the same data gives the same basis, bit for bit.
        idx = eigvecs.abs().argmax(dim=1, keepdim=True)
        signs = torch.sign(torch.gather(eigvecs, 1, idx))
        eigvecs = eigvecs * torch.where(signs == 0, 1.0, signs)
        return StreamBasis(mean.cpu().float(), eigvecs.float(), eigvals.float())


class _RecordingLayer(PassThroughLayer):
    """Accumulates moments and returns the states unchanged (each window is read in one forward pass)."""

    def __init__(self, sink: int, rope: RotaryFrame | None = None) -> None:
        super().__init__()
        self.sink, self.rope = sink, rope
        self.moments: dict[str, _Moments] = {}
        self.value_norms: list[torch.Tensor] = []  # [H, T] per window: what a secondary-sinks threshold is set by

    def process(self, key_states, value_states):
        keys = key_states
        if self.rope is not None:  # one window per pass, from position 0
            n = keys.shape[-2]
            keys = self.rope.unturn(keys, torch.arange(n, device=keys.device).expand(keys.shape[0], n))
        for name, x in (("keys", keys), ("values", value_states)):
            x = x[:, :, self.sink :]
            if name not in self.moments:
                self.moments[name] = _Moments(x.shape[1], x.shape[-1], x.device)
            self.moments[name].add(x)
        self.value_norms.append(value_states[:, :, self.sink :].float().norm(dim=-1).transpose(0, 1).flatten(1).cpu())
        return key_states, value_states

    def values_basis(self) -> StreamBasis:
        """The values' basis with the median length of a value vector per head (past the sink tokens)."""
        median = torch.cat(self.value_norms, 1).median(-1).values
        return replace(self.moments["values"].basis(), norm_median=median)


@dataclass
class CalibrationStats:
    """What calibration saw: enough to record the recipe in a preset."""

    tokens: int
    windows: int
    seq_len: int
    sink: int


@torch.no_grad()
def calibrate(
    model,
    windows: list[torch.Tensor],
    sink: int = 4,
    progress: bool = True,
    keys_before_rope: bool = False,
) -> tuple[Bases, CalibrationStats]:
    """Fit full ``d x d`` PCA bases for every layer's keys and values from ``windows`` (token id tensors [1, T]);
    ``keys_before_rope``: fit the key bases on keys un-turned by their positions (a codec with ``keys_before_rope``)."""
    shape = ModelShape.from_config(model.config)
    rope = RotaryFrame.from_config(model.config) if keys_before_rope else None
    layers = [_RecordingLayer(sink, rope) for _ in range(shape.num_layers)]
    device = next(model.parameters()).device
    for ids in tqdm(windows, desc="calibrating", unit="window", disable=not progress):
        cache = Cache(layers=layers)
        model(input_ids=ids.to(device), cache=cache, use_cache=True)
    bases = Bases()
    for i, layer in enumerate(layers):
        bases[(i, "keys")] = layer.moments["keys"].basis()
        bases[(i, "values")] = layer.values_basis()
    tokens = sum(int(w.shape[-1]) for w in windows)
    seq_len = int(windows[0].shape[-1]) if windows else 0
    return bases, CalibrationStats(tokens=tokens, windows=len(windows), seq_len=seq_len, sink=sink)
