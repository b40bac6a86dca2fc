"""Reading corpora into token sequences, identically for calibration, tuning and evaluation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .errors import KVHubError


def read_texts(paths: list[str | Path]) -> list[tuple[str, str]]:
    """``[(name, text)]`` for each file, or every ``*.txt`` in each folder, in sorted order (deterministic)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.txt")))
        elif p.is_file():
            files.append(p)
        else:
            raise KVHubError(f"corpus path '{p}' does not exist; fix: pass text files or folders of .txt files")
    if not files:
        raise KVHubError(f"no .txt files under {', '.join(map(str, paths))}; fix: point at a corpus folder")
    return [(f.stem, f.read_text(encoding="utf-8")) for f in files]


def corpus_sha256(paths: list[str | Path]) -> str:
    """One digest over the files' names and bytes, recorded in presets so a number can be traced to its text."""
    h = hashlib.sha256()
    for name, text in read_texts(paths):
        h.update(name.encode())
        h.update(text.encode("utf-8"))
    return h.hexdigest()


def token_windows(tokenizer, text: str, length: int, count: int, where: str = "middle") -> list[torch.Tensor]:
    """``count`` non-overlapping windows of ``length`` tokens, taken from the middle of the text (the protocol of
    docs/field.md) or spread evenly over it (``where='spread'``, for calibration)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    total = length * count
    if ids.numel() < length:
        raise KVHubError(f"text has {ids.numel()} tokens, fewer than one window of {length}; fix: use more text")
    if where == "middle":
        start = max(0, (ids.numel() - total) // 2)
        starts = [start + i * length for i in range(count) if start + (i + 1) * length <= ids.numel()]
    else:
        n_fit = ids.numel() // length
        picks = sorted({round(i * (n_fit - 1) / max(count - 1, 1)) for i in range(min(count, n_fit))})
        starts = [p * length for p in picks]
    return [ids[s : s + length].unsqueeze(0) for s in starts]
