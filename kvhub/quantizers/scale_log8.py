"""``log8``: each per-token scale stored as one byte, a step on a log grid around a per head and segment reference
(the RMS of the segment's calibrated deviations): ``scale = reference * 2**((code - 128) / 16)``, so 256 steps of
4.4% cover 1/256 to 245 times the reference. An fp16 scale carries 11 significant bits the quantizer does not
need: on SmolLM2 (bundled layout, one window per corpus, benchmarks/results/directions.json) this grid moved PPL by
-0.12 to +0.22 points on the books and -0.32 / -0.47 on the Python text (noise), while the scale bytes halve (10% of
the bundled preset's total).
An absmax rounds up to the next step (its outer level still reaches the largest coefficient), a deviation to the
nearest step in the log domain; a statistic off the grid's ends saturates at them. A loaded scale is clamped to
fp16's largest finite value: 245 times a reference above ~267 would otherwise load as inf and turn its tokens into
NaN."""

from __future__ import annotations

from functools import lru_cache

import torch

from .base import ScaleFormat, Statistic
from .scale_fp16 import FP16_MAX

STEPS_PER_OCTAVE = 16
ZERO = 128  # the code of the reference itself


@lru_cache(maxsize=None)
def _grid(device: torch.device) -> torch.Tensor:
    """``2**((code - 128) / 16)`` for every code, float32 [256], made once per device (read at every decode step)."""
    return torch.exp2((torch.arange(256, dtype=torch.float64, device=device) - ZERO) / STEPS_PER_OCTAVE).float()


class Log8Scale(ScaleFormat):
    name = "log8"
    dtype = torch.uint8
    bits = 8
    relative = True

    def store(self, stat: torch.Tensor, reference: torch.Tensor, statistic: Statistic) -> torch.Tensor:
        ref = reference[None, :, None, :]
        exponent = torch.log2(stat.clamp_min(1e-30) / ref) * STEPS_PER_OCTAVE + ZERO
        code = torch.ceil(exponent) if statistic == "absmax" else torch.round(exponent)
        code = code.clamp_(0, 255).to(torch.uint8)
        if statistic == "absmax":  # fp16 rounding of the loaded scale must not fall below the absmax
            short = (self.load(code, reference).float() < stat) & (code < 255)
            code = code + short.to(torch.uint8)
        return code

    def load(self, stored: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        grid = _grid(stored.device)
        return (grid[stored.long()] * reference[None, :, None, :]).clamp_(max=FP16_MAX).half()

    def table(self, reference: torch.Tensor) -> torch.Tensor:
        codes = torch.arange(256, dtype=torch.uint8, device=reference.device)
        heads, groups = reference.shape
        loaded = self.load(codes[None, None, :, None].expand(1, heads, 256, groups), reference)  # [1, H, 256, G]
        return loaded[0].float().transpose(-1, -2).contiguous()
