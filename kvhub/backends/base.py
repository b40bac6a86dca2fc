"""What a decode backend is: a way to run attention over a layer's compressed history and its exact tokens, with
the cases it handles declared up front (:class:`Capabilities`), so the choice between backends, and the reason a
faster one was passed over, can be shown before anything runs (README's "Which attention runs when" table is made
from these declarations)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class DecodeCall:
    """One attention call on compressed history. ``query`` [B, Hq, M, d]; ``keys``/``values`` the layer's
    :class:`~kvhub.stream.CompressedStream` s, of which the first ``history`` tokens are read; ``exact_k``/``exact_v``
    [B, Hkv, Te, d] the exact tokens (sink, recent, new) in storage order; ``history_mask`` [B, M, history] and
    ``exact_mask`` [B, M, Te] additive float masks (None: nothing hidden); ``softcap`` applies ``c * tanh(s / c)``
    to the scaled scores before the masks; ``exact_rows`` the layer's :class:`~kvhub.secondary_sinks.SecondarySinks`
    (None: the codec keeps none), whose rows among the history a backend must restore."""

    query: torch.Tensor
    keys: object
    values: object
    history: int
    exact_k: torch.Tensor
    exact_v: torch.Tensor
    history_mask: torch.Tensor | None
    exact_mask: torch.Tensor | None
    scaling: float
    softcap: float | None
    exact_rows: object = None

    def sinks(self):
        """``(rows, tokens, residuals)`` of the secondary sinks among this call's history, or None
        (:meth:`kvhub.secondary_sinks.SecondarySinks.visible`)."""
        return None if self.exact_rows is None else self.exact_rows.visible(self.history)


@dataclass(frozen=True)
class Capabilities:
    """What a backend declares it handles; :meth:`DecodeBackend.supports` checks a call against it."""

    devices: tuple[str, ...]  # torch device types ("cpu", "cuda")
    max_query_tokens: int | None  # None: any number (the PyTorch path tiles long chunks)
    query_dtypes: tuple[torch.dtype, ...]
    stored_dtypes: tuple[torch.dtype, ...]  # of 16-bit segments (the cache's exact dtype)
    scale_dtypes: tuple[torch.dtype, ...]  # per-token scales as stored: fp16 values, uint8 codes (log8)
    max_rank: int | None = None
    max_segments: int | None = None
    keys_before_rope: bool = False  # scores keys coded before RoPE (decoded and turned per position)
    vector_codes: bool = False  # reads segments whose bytes are codewords of a codebook (kvhub.quantizers.vector)
    secondary_sinks: bool = False  # restores the token-heads a codec keeps exact beside their codes
    levels: str = "uniform, Lloyd-Max"  # scalar level sets read (vector codes: the flag above)
    masks: str = "SDPA, eager, flash-attention (None or 2-D: the layer adds the causal and window part)"


def _names(dtypes) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


class DecodeBackend(ABC):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def unavailable(self, device: torch.device, forced: bool = False) -> str | None:
        """Why this backend cannot run at all for tensors on ``device`` here (not built, not installed, wrong
        device), or None. ``forced``: asked for by name (``KVHUB_KERNELS``), not chosen automatically."""
        if device.type not in self.capabilities.devices:
            return f"runs on {'/'.join(self.capabilities.devices)} tensors, not {device.type}"
        return None

    def supports(self, call: DecodeCall) -> str | None:
        """Why this backend does not handle ``call``, or None when it does (after :meth:`unavailable`)."""
        cap = self.capabilities
        q_len = call.query.shape[2]
        if cap.max_query_tokens is not None and q_len > cap.max_query_tokens:
            return f"{q_len} query tokens, more than {cap.max_query_tokens}"
        if call.query.dtype not in cap.query_dtypes:
            return f"{_names([call.query.dtype])} queries (handles {_names(cap.query_dtypes)})"
        for stream in (call.keys, call.values):
            for store, seg in zip(stream.codes, stream.segments):
                if seg.bits == 16 and store.buf.dtype not in cap.stored_dtypes:
                    return f"16-bit segments stored as {_names([store.buf.dtype])} (handles {_names(cap.stored_dtypes)})"
            if stream.n_scaled and stream.scales.buf.dtype not in cap.scale_dtypes:
                return f"scales stored as {_names([stream.scales.buf.dtype])}"
            if cap.max_rank is not None and stream.codec.rank > cap.max_rank:
                return f"rank {stream.codec.rank}, more than {cap.max_rank}"
            if cap.max_segments is not None and len(stream.segments) > cap.max_segments:
                return f"{len(stream.segments)} segments, more than {cap.max_segments}"
        if not cap.vector_codes and (call.keys.vector_codes or call.values.vector_codes):
            return "vector codes (each byte a codeword, decoded through the codebook)"
        if not cap.secondary_sinks and call.exact_rows is not None and len(call.exact_rows):
            return "secondary sinks kept exact (residual rows added to their scores and values)"
        if call.keys.rope is not None and not cap.keys_before_rope:
            return "keys coded before RoPE (scored from keys decoded and turned by their positions)"
        return None

    @abstractmethod
    def attend(self, call: DecodeCall) -> torch.Tensor:
        """Attention output [B, M, Hq, d] in the query's dtype (fp32 accumulation)."""

    def describe(self) -> dict[str, str]:
        """The declared capabilities as one table row."""
        cap = self.capabilities
        return {
            "backend": self.name,
            "devices": "/".join(cap.devices),
            "query tokens": "any" if cap.max_query_tokens is None else f"<= {cap.max_query_tokens}",
            "query dtypes": _names(cap.query_dtypes),
            "16-bit segments stored as": _names(cap.stored_dtypes),
            "keys": "after or before RoPE" if cap.keys_before_rope else "after RoPE",
            "levels": cap.levels + (", vector codes" if cap.vector_codes else ""),
            "secondary sinks": "yes" if cap.secondary_sinks else "no",
            "scales": _names(cap.scale_dtypes).replace("float16", "fp16").replace("uint8", "log8"),
            "masks": cap.masks,
            "limits": ", ".join(f"{k} <= {v}" for k, v in (("rank", cap.max_rank), ("segments", cap.max_segments))
                                if v is not None) or "none",
        }
