"""A cache layer for single-pass reads: it sees one whole window per forward pass and keeps nothing, so tools can
observe (calibration) or perturb (the tuner's sensitivity probe) every layer's keys and values in place."""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin


class PassThroughLayer(CacheLayerMixin):
    """Returns ``process(keys, values)``; the default returns them unchanged. Holds no past: one window per pass."""

    def process(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.process(key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1
