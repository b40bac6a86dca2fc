"""The three byte figures of a compressed cache, with their definitions, and the ratios built on them.

``CompressedCache.nbytes()`` is the figure that scales with batch and context, so it is the headline; but a user's
device also holds the preset's bases (once per model and device) and whatever the buffers reserve beyond what is
filled. Everywhere kvhub shows a ratio it shows these next to it, worded as below, so no figure is read alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PER_SEQUENCE = "codes + scales + exact tokens held; grows with batch and context"
SHARED_BASES = "the preset's bases, paid once per model and device"
ALLOCATED = "what the cache's buffers reserve, growth headroom included"
DEFINITIONS = {"per sequence": PER_SEQUENCE, "shared bases": SHARED_BASES, "allocated": ALLOCATED}


@dataclass(frozen=True)
class Footprint:
    """Bytes of one measurement: ``fp16`` is what an fp16 K+V cache would hold for the same tokens and batch;
    ``allocated`` is None where the measurement did not record it (older presets)."""

    tokens: int
    batch: int
    fp16: int
    per_sequence: int
    shared_bases: int
    allocated: int | None

    @classmethod
    def of_cache(cls, cache: Any, batch: int) -> "Footprint":
        """Read off a filled ``CompressedCache`` (its own methods; tokens from the longest layer)."""
        return cls(cache.get_seq_length(), batch, cache.fp16_nbytes(), cache.nbytes()["total"],
                   cache.bases_nbytes(), cache.reserved_nbytes())

    @classmethod
    def of_metrics(cls, metrics: dict[str, Any], shared_bases: int) -> "Footprint":
        """From a preset's ``metrics`` (measured at batch 1); ``shared_bases`` from the preset's own tensors, since
        metrics written before these figures existed do not record them."""
        held = metrics["bytes"]
        per_sequence = held["total"]
        # Older metrics lack the fp16 count; their ratio (rounded to 4 decimals) gives it within 0.01%.
        fp16 = held.get("fp16") or round(per_sequence * metrics["compression"]["total"])
        return cls(metrics["context_length"], 1, fp16, per_sequence, held.get("bases", shared_bases),
                   held.get("allocated"))

    @property
    def ratio(self) -> float:
        """fp16 bytes / per-sequence bytes: the headline compression."""
        return self.fp16 / self.per_sequence

    @property
    def ratio_with_bases(self) -> float:
        """fp16 bytes / (per-sequence + shared bases): the bases amortized over the batch this ran at."""
        return self.fp16 / (self.per_sequence + self.shared_bases)

    def break_even_tokens(self, batch: int = 1) -> int:
        """The context length from which ``batch`` sequences in such a cache plus the shared bases take fewer bytes
        than an fp16 cache: the bases over what each token saves, at this measurement's per-token rates (so about:
        at a short context the exact sink tokens weigh a little more)."""
        saved_per_token = (self.fp16 - self.per_sequence) / (self.tokens * self.batch)
        return math.ceil(self.shared_bases / (saved_per_token * batch))

    def record(self) -> dict[str, int]:
        """The figures a ``metrics.bytes`` block stores next to the per-part counts."""
        out = {"fp16": self.fp16, "bases": self.shared_bases}
        if self.allocated is not None:
            out["allocated"] = self.allocated
        return out

    def lines(self, indent: str = "") -> list[str]:
        """Human-readable report: the three figures with their definitions and the two ratios."""
        allocated = (f"{self.allocated:>13,}         ({ALLOCATED})" if self.allocated is not None else
                     "not recorded by this measurement (`kvhub eval --write-metrics` records it)")
        return [
            f"{indent}bytes at {self.tokens} tokens, batch {self.batch}, ratios against an fp16 K+V cache:",
            f"{indent}  per sequence {self.per_sequence:>13,}  {self.ratio:.2f}x  ({PER_SEQUENCE})",
            f"{indent}  shared bases {self.shared_bases:>13,}         ({SHARED_BASES})",
            f"{indent}  allocated    {allocated}",
            f"{indent}  with the shared bases amortized over batch {self.batch}: {self.ratio_with_bases:.2f}x",
        ]
