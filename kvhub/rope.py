"""Keys coded before RoPE: the rotary frame a cache un-turns keys out of before coding and turns them back into after
decoding.

The cache sees keys after RoPE, which turns each channel pair ``(i, i + d/2)`` by an angle ``p * theta_i`` that
grows with the position ``p``. A key channel's steady outlier then points another way at every position, and a
post-RoPE basis cannot take it out with its mean; before RoPE it can. Measured on the benchmark model
(``benchmarks/results/prerope_keys.json``): the keys' calibrated variance falls by 46%, and at 4.89x the worst
domain's perplexity loss halves. The price: a stored key must be turned back by its own position before a query
reads it, so key scores are computed from decoded keys, not in the compressed space (values keep that path), and
each stored token keeps its position.

Only RoPE whose angle depends on the position alone can be undone this way: ``dynamic`` and ``longrope`` rescale
with the sequence length, partial rotary factors leave channels unturned, and per-layer-type RoPE (Gemma-3) differs
between layers; those are refused with :class:`RopeFrameError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import CodecError

_LENGTH_DEPENDENT = ("dynamic", "longrope")


class RopeFrameError(CodecError):
    """The model's RoPE cannot be undone per position, so its keys cannot be coded before RoPE."""


@dataclass(frozen=True, eq=False)
class RotaryFrame:
    """A model's RoPE: ``inv_freq`` [d/2] (float32) and the factor ``scaling`` its cos and sin carry (1 for plain
    RoPE; YaRN and others scale them)."""

    inv_freq: torch.Tensor
    scaling: float = 1.0

    @classmethod
    def from_config(cls, config: Any) -> "RotaryFrame":
        """The frame of a transformers config, as its rotary embedding computes it, or :class:`RopeFrameError`."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        params = getattr(config, "rope_parameters", None)
        name = getattr(config, "model_type", "this model")
        if not isinstance(params, dict) or "rope_type" not in params:
            raise RopeFrameError(f"{name} has no single RoPE for all layers (rope_parameters={params!r:.80}); "
                                 "fix: keep its keys coded after RoPE (drop keys_before_rope)")
        kind = params["rope_type"]
        if kind in _LENGTH_DEPENDENT or kind not in ("default", *ROPE_INIT_FUNCTIONS):
            raise RopeFrameError(f"{name}'s RoPE type {kind!r} is not a function of the position alone; fix: keep "
                                 "its keys coded after RoPE (drop keys_before_rope)")
        if float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
            raise RopeFrameError(f"{name} turns only part of each head by RoPE; fix: keep its keys coded after RoPE "
                                 "(drop keys_before_rope)")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if kind == "default":
            base = float(params["rope_theta"])
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            return cls(inv_freq, 1.0)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
        return cls(inv_freq.float(), float(scaling))

    def _angles(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, 1, T, d/2] (float32, unscaled) of ``positions`` [B, T]: one angle per channel pair (the
        model's [cos, cos] halves are equal, so half the trigonometry of a step that turns every stored key)."""
        freqs = positions.to(device=device, dtype=torch.float32)[..., None] * self.inv_freq.to(device)
        return freqs[:, None].cos(), freqs[:, None].sin()

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor, sign: float) -> torch.Tensor:
        """Each channel pair ``(i, i + d/2)`` of ``x`` turned by ``sign`` times its angle (float32 out): transformers'
        ``x * cos + rotate_half(x) * sin`` (sign 1) or its inverse (sign -1), computed on the two halves, with the
        same roundings (``a + (-b)`` is ``a - b`` exactly)."""
        cos, sin = self._angles(positions, x.device)
        x = x.float()
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.empty_like(x)
        if sign > 0:
            torch.sub(x1 * cos, x2 * sin, out=out[..., :half])
            torch.add(x2 * cos, x1 * sin, out=out[..., half:])
        else:
            torch.add(x1 * cos, x2 * sin, out=out[..., :half])
            torch.sub(x2 * cos, x1 * sin, out=out[..., half:])
        return out

    def turn(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE at ``positions`` [B, T] on ``x`` [B, H, T, d], as the model applies it (float32 out)."""
        out = self._rotate(x, positions, 1.0)
        return out if self.scaling == 1.0 else out * self.scaling

    def unturn(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`turn`: keys as ``k_proj`` made them (float32 out)."""
        out = self._rotate(x, positions, -1.0)
        return out if self.scaling == 1.0 else out / self.scaling
