"""One exception family for everything a user can get wrong, so callers catch ``KVHubError`` and the CLI can
print a single line instead of a traceback. Each message names the problem and the fix."""

from __future__ import annotations


class KVHubError(Exception):
    """Base class of every error kvhub raises on bad input or an unreachable resource."""


class CodecError(KVHubError, ValueError):
    """A codec (ranks, bits, scale scheme, bases) that cannot work with the model it is applied to."""


class ModelLoadError(KVHubError):
    """A model that cannot be loaded."""


class PresetError(KVHubError):
    """A preset folder or config that is malformed or inconsistent. Subclasses name the kind of problem."""


class PresetFormatError(PresetError):
    """Malformed JSON or a config that violates the JSON Schema."""


class PresetFileError(PresetError):
    """A tensor file that is missing, truncated, corrupted, or fails its checksum."""


class PresetTensorError(PresetError):
    """A tensor that is missing, of the wrong shape or dtype, non-finite, or not orthonormal."""


class PresetModelMismatchError(PresetError):
    """A preset built for another model (layers, heads, head_dim or name)."""


class PresetExistsError(PresetError, FileExistsError):
    """Saving into a non-empty folder without ``overwrite=True``."""


class HubError(KVHubError):
    """Resolving, downloading or publishing a preset on the Hub failed."""


class RegistryError(KVHubError):
    """The registry index is malformed or does not know a model."""
