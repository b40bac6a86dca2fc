"""kvhub: calibrated, really-compressed KV caches for open LLMs.

Public API (imported lazily so ``kvhub --help`` never loads torch)::

    from kvhub import KVPreset, CompressedCache, load_preset_cache, calibrate
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "CompressedCache": "kvhub.cache",
    "CacheCodec": "kvhub.codec",
    "LayerCodec": "kvhub.codec",
    "StreamCodec": "kvhub.codec",
    "Segment": "kvhub.codec",
    "ModelShape": "kvhub.codec",
    "Bases": "kvhub.bases",
    "calibrate": "kvhub.calibration",
    "KVPreset": "kvhub.preset",
    "load_preset_cache": "kvhub.preset",
    "load_model": "kvhub.models",
    "compressed_attention": "kvhub.attention",
}
_ERRORS = (
    "KVHubError", "CodecError", "ModelLoadError", "PresetError", "PresetFormatError", "PresetFileError",
    "PresetTensorError", "PresetModelMismatchError", "PresetExistsError", "HubError", "RegistryError",
)
for _name in _ERRORS:
    _LAZY[_name] = "kvhub.errors"

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from .attention import compressed_attention
    from .bases import Bases
    from .cache import CompressedCache
    from .calibration import calibrate
    from .codec import CacheCodec, LayerCodec, ModelShape, Segment, StreamCodec
    from .errors import *  # noqa: F403
    from .models import load_model
    from .preset import KVPreset, load_preset_cache


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvhub' has no attribute '{name}'")
