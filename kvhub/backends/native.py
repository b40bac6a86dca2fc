"""The C backend: the PyTorch backend's tiling and softmax around the two C kernels of
:mod:`kvhub.kernels.cpu`, which unpack each token's codes inside the score and value products (one pass over the
stored rows per product, no per-plane ops). CPU tensors, decode steps and short speculative chunks."""

from __future__ import annotations

import torch

from ..kernels import cpu
from .base import Capabilities
from .torch_ops import TorchBackend

MAX_QUERY_TOKENS = 16  # decode and small speculative batches; longer chunks tile better as matmuls


class NativeBackend(TorchBackend):
    name = "native"
    capabilities = Capabilities(
        devices=("cpu",), max_query_tokens=MAX_QUERY_TOKENS,
        query_dtypes=(torch.float16, torch.bfloat16, torch.float32),
        stored_dtypes=tuple(cpu.DTYPES), scale_dtypes=tuple(cpu.SCALE_KINDS),
        max_rank=cpu.MAX_RANK, max_segments=cpu.MAX_SEGMENTS,
        secondary_sinks=True,  # the PyTorch backend's attend restores them around the kernels' products
    )

    def unavailable(self, device: torch.device, forced: bool = False) -> str | None:
        reason = super().unavailable(device)
        if reason is None and cpu.library() is None:
            reason = "no C compiler built the CPU kernels (install gcc or clang, or set CC)"
        return reason

    def prepare(self, call):
        return None

    def scores(self, g, call, prepared, out):
        cpu.history_scores(g.contiguous(), call.keys, call.history, out)

    def values(self, probs, call, prepared):
        return cpu.history_values(probs, call.values, call.history)
