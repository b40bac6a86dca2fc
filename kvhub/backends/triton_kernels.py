"""The Triton backend: the fused flash-decoding kernels of :mod:`kvhub.kernels.triton_decode` (both products and
the softmax in two kernels, codes unpacked in registers). CUDA tensors; CPU tensors only under
``TRITON_INTERPRET=1`` (Triton's interpreter, how the test suite proves the kernels without a GPU). Triton is
imported only when these kernels run, so CPU runs never pay for it."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .base import Capabilities, DecodeBackend, DecodeCall

MAX_QUERY_TOKENS = 16  # decode and small speculative batches; prefill keeps the model's own attention


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class TritonBackend(DecodeBackend):
    name = "triton"
    capabilities = Capabilities(
        devices=("cuda",), max_query_tokens=MAX_QUERY_TOKENS,
        query_dtypes=(torch.float16, torch.bfloat16, torch.float32),
        stored_dtypes=(torch.float16, torch.bfloat16, torch.float32),
        scale_dtypes=(torch.float16, torch.uint8),
    )

    def unavailable(self, device: torch.device, forced: bool = False) -> str | None:
        if not triton_available():
            return "triton is not installed (pip install triton)"
        if forced and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None  # the interpreter: for proving the kernels, never chosen by itself
        return super().unavailable(device)

    def attend(self, call: DecodeCall) -> torch.Tensor:
        from ..kernels.triton_decode import decode_attention

        out = decode_attention(call.query, call.keys, call.values, call.history, call.exact_k, call.exact_v,
                               call.history_mask, call.exact_mask, call.scaling, call.softcap)
        return out.transpose(1, 2).contiguous()
