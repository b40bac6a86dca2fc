"""The storage codec's file in a preset folder: ``storage.safetensors``, described by the config's ``storage`` section.

A preset without a storage codec stays valid; one with it lists the file in ``files`` like the bases (so ``kvhub
pull``, ``push`` and the registry's pins cover it), and the section says how to read it: the format and its
version, the groups (stream, layers, rank) and the budgets. The file is read only when a storage-form serde asks
for it (it is larger than the bases: every kept coefficient of a cross-layer transform, both ways), within the size
the section implies, hashed against the config's record, and its header checked (exact names, dtypes, shapes)
before any tensor is built.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import CodecError, PresetFileError, PresetTensorError
from .preset_files import HEADER_LIMITS, STORAGE_NAME, ChangedDuringRead, read_listed, safetensors_header

STORAGE_FORMAT = "kvhub-storage-codec/1"
_DTYPE_BYTES = {"F32": 4, "F16": 2, "U8": 1}


def expected_tensors(config: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name to ``(dtype, shape)`` of every tensor the config's ``storage`` section needs, and nothing else."""
    section, b = config["storage"], config["base_model"]
    width = b["num_key_value_heads"] * b["head_dim"]
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for i, g in enumerate(section["groups"]):
        f, k = len(g["layers"]) * width, g["rank"]
        out |= {f"groups.{i}.mean": ("F32", (f,)), f"groups.{i}.basis": ("F16", (k, f)),
                f"groups.{i}.whiten": ("F32", (len(g["layers"]), width, width)), f"groups.{i}.sigma": ("F32", (k,))}
        out |= {f"budgets.{name}.{i}": ("U8", (k,)) for name in section["budgets"]}
    return out


def storage_bytes(codec: Any) -> bytes:
    from safetensors.torch import save

    return save(codec.to_tensors(), metadata={"format": STORAGE_FORMAT})


def read_storage(folder: Path, config: dict[str, Any]) -> Any:
    """The :class:`~kvhub.storage_codec.StorageCodec` of the preset in ``folder`` (its config ``config``)."""
    from safetensors.torch import load

    from .storage_codec import StorageCodec

    path = folder / STORAGE_NAME
    entry = next((f for f in config["files"] if f["name"] == STORAGE_NAME), None)
    if entry is None:
        raise PresetFileError(f"{folder}: the config has a storage section but does not list {STORAGE_NAME}; fix: "
                              "re-fit the storage codec (kvhub fit-storage) or re-download the preset")
    expected = expected_tensors(config)
    most = 8 + HEADER_LIMITS.max_bytes + sum(_DTYPE_BYTES[t] * math.prod(s) for t, s in expected.values())
    if entry["size"] > most:
        raise PresetTensorError(f"{path}: {entry['size']} bytes, more than the {most} its storage section implies; "
                                "fix: re-fit the storage codec")
    try:
        data = read_listed(folder, entry)
    except ChangedDuringRead as exc:
        raise exc.error from None
    header = safetensors_header(path, data)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or meta.get("format") != STORAGE_FORMAT:
        raise PresetFileError(f"{path}: not a kvhub storage codec file ({STORAGE_FORMAT}); fix: re-fit it")
    for key, info in header.items():
        want = expected.get(key)
        got = (info.get("dtype"), tuple(info.get("shape") or ())) if isinstance(info, dict) else None
        if want is None or got != want:
            raise PresetTensorError(f"{path}: tensor '{str(key)[:80]}' is {got}, the storage section needs {want}; "
                                    "fix: re-fit the storage codec for this model")
    if len(header) != len(expected):
        raise PresetTensorError(f"{path}: {len(expected) - len(header)} tensors of the storage section are missing; "
                                "fix: re-fit the storage codec")
    b = config["base_model"]
    try:
        return StorageCodec.from_tensors(config["storage"], load(data), b["num_hidden_layers"],
                                         b["num_key_value_heads"], b["head_dim"])
    except CodecError as exc:
        raise PresetTensorError(f"{path}: {exc}") from None


__all__ = ["STORAGE_NAME", "STORAGE_FORMAT", "expected_tensors", "read_storage", "storage_bytes"]
