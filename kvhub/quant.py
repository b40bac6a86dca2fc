"""Bit packing of scalar codes. Which code a coefficient gets, and what each code decodes to, is a quantizer's job
(``kvhub.quantizers``: one class per quantizer and per scale scheme)."""

from __future__ import annotations

import torch

CODES_PER_BYTE = {2: 4, 4: 2, 8: 1}


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes along the last dim: two 4-bit or four 2-bit codes per byte (low bits first)."""
    per = CODES_PER_BYTE[bits]
    if per == 1:
        return q
    q = q.view(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
    return (q << shifts).sum(-1, dtype=torch.uint8)


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    per = CODES_PER_BYTE[bits]
    if per == 1:
        return p
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=p.device)
    mask = (1 << bits) - 1
    return ((p.unsqueeze(-1) >> shifts) & mask).flatten(-2)
