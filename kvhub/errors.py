"""One exception family for everything a user can get wrong, so callers catch ``KVHubError`` and the CLI can
print a single line instead of a traceback. Each message names the problem and the fix."""

from __future__ import annotations


class KVHubError(Exception):
    """Base class of every error kvhub raises on bad input or an unreachable resource."""


class CodecError(KVHubError, ValueError):
    """A codec (ranks, bits, scale scheme, bases) that cannot work with the model it is applied to."""


class CodecRangeError(CodecError):
    """Bases whose statistics (means, variances) would decode to keys or values beyond what the model's dtype holds,
    or that the decoder would clamp (zero, denormal or absurdly small variances)."""


class ModelLoadError(KVHubError):
    """A model that cannot be loaded."""


class UntrustedPathError(KVHubError):
    """A file or folder in kvhub's cache that another user could have written (owner, mode or a link): kvhub loads
    no code or weights from it."""


class DeviceError(KVHubError, ValueError):
    """A device (``--device``) that is not a device name, or that this machine or this torch build does not have."""


class ChunkError(KVHubError, ValueError):
    """A serialized KV chunk (``kvhub.integrations``) that cannot be decoded. Subclasses name the kind of problem."""


class ChunkFormatError(ChunkError):
    """Not a kvhub chunk, or one written by an unknown format version."""


class ChunkTruncatedError(ChunkError):
    """A buffer shorter than its header and shape say it must be."""


class ChunkChecksumError(ChunkError):
    """A chunk whose bytes are not the ones written (its CRC-32 fails): corrupted in a store, or altered."""


class ChunkPresetMismatchError(ChunkError):
    """A chunk encoded with another preset than the one decoding it: refused, never decoded into garbage."""


class ChunkShapeError(ChunkError):
    """A chunk whose layers, tokens, heads, head_dim, dtype or tensor-parallel slice do not match what is asked."""


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


class PresetWriteError(PresetError):
    """Saving a preset failed (permissions, a file where a folder should be, a full disk); nothing was half-written."""


class HubError(KVHubError):
    """Resolving, downloading or publishing a preset on the Hub failed. Subclasses name the kind of failure."""


class HubNotFoundError(HubError):
    """A repo, or a file in it, that the Hub does not have."""


class HubRevisionNotFoundError(HubNotFoundError):
    """A branch, tag or commit that the repo does not have."""


class HubAuthError(HubError):
    """A private repo asked for without a token, or a token the Hub rejects (reading or writing)."""


class HubNetworkError(HubError):
    """The Hub could not be reached or failed (connection, timeout, 5xx); retrying may help."""


class HubOfflineError(HubError):
    """Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``) and what was asked for is not in the local cache."""


class HubRepoIdError(HubError, ValueError):
    """A repo id the Hub would refuse (not ``org/name``, ``--`` or ``..``, over 96 characters ...)."""


class HubUnsafePathError(HubError):
    """A registry entry or repo naming a file outside the preset's own folder (``../x``, ``/etc/x``, a link out)."""


class HubChecksumError(HubError):
    """A downloaded file whose sha256 or size differs from the registry entry or the preset config."""


class HubTooLargeError(HubError):
    """A download larger than the size pinned for it (registry entry or preset config) or than kvhub's cap."""


class HubModelMismatchError(HubError):
    """A preset whose config names another base model, or another revision of it, than its registry entry."""


class RegistryError(KVHubError):
    """The registry index is malformed or does not know a model."""


class RegistryFormatError(RegistryError):
    """An index that violates ``schemas/registry.schema.json`` or lists a name twice."""


class UnknownModelError(RegistryError):
    """A name that is neither in the registry nor a Hub repo id."""


class NoPresetError(RegistryError):
    """A model the registry knows but for which no validated preset is published (pending or failed)."""


class PullRequestError(RegistryError):
    """A pull request whose changes cannot be verified as preset data (code, links, oversize or unknown files)."""


class CorpusNotFoundError(KVHubError, FileNotFoundError):
    """A default calibration or evaluation corpus is not where kvhub looks (e.g. kvhub installed from a wheel)."""
