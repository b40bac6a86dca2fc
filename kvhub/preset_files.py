"""The preset's file format: which files a preset folder holds and how they are read and written, below the object
API (:class:`~kvhub.preset.KVPreset`, which only delegates here) and the Hub transport (:mod:`kvhub.hub_presets`),
so both use one reader and neither imports the other for it.

Every file is read within bounds (sizes, counts, nesting, finite values; see :mod:`kvhub.safe_json`), never through
a link that leaves the folder, and each tensor file is read once, so the bytes that were hashed are the bytes that
are parsed. A save replaces only the preset's own files (config, bases, card), never anything else in the folder, in
an order that keeps every reader consistent (see :func:`write_preset`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .codec import STREAMS, CacheCodec, ModelShape
from .errors import (
    CodecError,
    PresetError,
    PresetExistsError,
    PresetFileError,
    PresetFormatError,
    PresetTensorError,
    PresetWriteError,
)
from .safe_json import JsonLimits, loads
from .schema import SCHEMA_VERSION, validate_config

CONFIG_NAME = "kvhub_preset.json"
BASES_NAME = "bases.safetensors"
STORAGE_NAME = "storage.safetensors"  # the optional storage codec (kvhub.storage_files reads it, on demand)
CARD_NAME = "README.md"
BASES_FORMAT = "kvhub-bases/1"
_ALLOWED_DTYPES = ("F32", "F16")
CONFIG_LIMITS = JsonLimits(max_bytes=1 << 20)
HEADER_LIMITS = JsonLimits(max_bytes=1 << 20, max_depth=4)  # 6144 tensors (1024 layers) need ~0.6 MB
# A save writes the new bases under this name first (see save_pretrained); a leftover one is cleaned by the next save.
_STAGED_BASES = "bases.{}.safetensors"
_READ_ATTEMPTS = 8


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in blocks (``huggingface_hub``'s, as the client hashes what it uploads)."""
    from huggingface_hub.utils.sha import sha_fileobj

    with open(path, "rb") as f:
        return sha_fileobj(f).hex()


def member_path(folder: Path, name: str) -> Path:
    """The real path of the file ``name`` of the preset in ``folder``, refusing one that leaves the folder.

    A file may be a link only into the folder itself, or, for a Hugging Face cache snapshot
    (``.../snapshots/<commit>/``), into that repo's ``blobs/`` folder, which is how the cache stores every file."""
    root = folder.resolve()
    path = root / name
    real = path.resolve()
    if real.parent == root:
        return real
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink() and real.parent == blobs:
        return real
    raise PresetFileError(f"{folder / name}: links outside the preset folder (to {real}); fix: copy the file into the "
                          "folder instead of linking to it")


def _read_config_bytes(folder: Path) -> bytes:
    if not folder.is_dir():
        raise PresetFileError(f"{folder}: no such preset folder; fix: pass a folder holding {CONFIG_NAME}")
    path = member_path(folder, CONFIG_NAME)
    if not path.is_file():
        raise PresetFileError(f"{folder / CONFIG_NAME}: missing; fix: a preset folder needs {CONFIG_NAME} (kvhub tune writes one)")
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_LIMITS.max_bytes + 1)
    except OSError as exc:
        raise PresetFileError(f"{folder / CONFIG_NAME}: cannot be read ({exc.strerror}); fix: check its permissions") from None
    return data


def _parse_config(data: bytes, where: str) -> dict[str, Any]:
    """The config in ``data``: safe JSON, the schema, then what the schema cannot say (repo-id rules, layer counts)."""
    config = loads(data, where, PresetFormatError, CONFIG_LIMITS)
    validate_config(config, where)
    check_semantics(config, where)
    return config


def check_semantics(config: dict[str, Any], where: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    base = config["base_model"]
    try:
        validate_repo_id(base["id"])
    except HFValidationError as exc:
        raise PresetFormatError(f"{where}: base_model.id is not a Hub repo id ({str(exc).splitlines()[0][:160]}); "
                                "fix: use the model's Hub id (org/name)") from None
    if config["codec"]["num_layers"] != base["num_hidden_layers"]:
        raise PresetFormatError(
            f"{where}: codec.num_layers is {config['codec']['num_layers']} but base_model.num_hidden_layers is "
            f"{base['num_hidden_layers']}; fix: use a preset made for this model"
        )
    try:  # before any tensor is read: the codec decides which tensors, of which shapes, the file must hold
        CacheCodec.from_dict(config["codec"]).check(ModelShape(base["num_hidden_layers"], base["num_key_value_heads"],
                                                               base["head_dim"]))
    except CodecError as exc:
        raise PresetFormatError(f"{where}: {exc}") from None
    listed = STORAGE_NAME in {f["name"] for f in config["files"]}
    if listed != ("storage" in config):
        raise PresetFormatError(f"{where}: the config {'lists' if listed else 'does not list'} {STORAGE_NAME} but "
                                f"{'has no' if listed else 'has a'} storage section; fix: re-fit the storage codec "
                                "(kvhub fit-storage) or re-download the preset")
    if "storage" in config:
        covered = sorted(i for g in config["storage"]["groups"] for i in g["layers"])
        if covered != sorted(list(range(base["num_hidden_layers"])) * 2):
            raise PresetFormatError(f"{where}: the storage groups do not cover each layer's keys and values once; "
                                    "fix: re-fit the storage codec")


def read_config(folder: Path) -> dict[str, Any]:
    """The validated config of the preset in ``folder`` (for callers that need the config but not the tensors)."""
    return _parse_config(_read_config_bytes(folder), str(folder / CONFIG_NAME))


@dataclass
class PresetFiles:
    """What a preset folder holds, read and checked: the config, the bases cut to its codec
    (:class:`~kvhub.bases.Bases`) and how the basis is stored (``F16`` or ``F32``)."""

    config: dict[str, Any]
    bases: Any
    basis_dtype: str


def read_preset(folder: Path) -> PresetFiles:
    """Read and check the preset in ``folder``. The config is read once and the files it names after it; if one of
    them is missing or differs while the config itself has changed meanwhile, a save replaced the preset during the
    read (see :func:`write_preset`), and the read starts again from the new config."""
    where = str(folder / CONFIG_NAME)
    for attempt in range(_READ_ATTEMPTS):
        raw = _read_config_bytes(folder)
        config = _parse_config(raw, where)
        try:
            tensors, basis_dtype = _load_tensor_files(folder, config)
            break
        except ChangedDuringRead as exc:
            if attempt + 1 == _READ_ATTEMPTS or _read_config_bytes(folder) == raw:
                raise exc.error from None
    from .bases import Bases  # torch is imported only once the files passed every check that does not need it

    bases = checked_bases(config, Bases.from_tensors(tensors), str(folder / config["files"][0]["name"]))
    return PresetFiles(config, bases, basis_dtype)


def checked_bases(config: dict[str, Any], bases: Any, where: str) -> Any:
    """``bases`` checked against the config's codec and model, cut to the codec (raises :class:`PresetTensorError`)."""
    b = config["base_model"]
    shape = ModelShape(b["num_hidden_layers"], b["num_key_value_heads"], b["head_dim"])
    try:
        codec = CacheCodec.from_dict(config["codec"])
        codec.check(shape)
        return bases.for_codec(codec, shape)
    except CodecError as exc:
        raise PresetTensorError(f"{where}: {exc}") from exc


def write_preset(folder: Path, config: dict[str, Any], data: bytes, card: Callable[[dict[str, Any]], str],
                 overwrite: bool = False, storage: bytes | None = None) -> dict[str, Any]:
    """Write ``config`` (its ``files`` filled in), the bases file ``data`` and the model card ``card(config)`` into
    ``folder``, replacing only those files; returns the config written.

    Nothing else in the folder is touched (a ``recipe.json`` beside the preset stays). A reader never sees a config
    and bases from different saves: the new bases go under a content-addressed name first, a config naming that
    file replaces the old one, ``bases.safetensors`` is replaced, then the final config naming it; every step is a
    whole-file ``os.replace``, so a save killed at any point leaves a loadable preset (old or new), and a reader
    that finds a named file changed or gone sees the config changed and reads again. Leftovers of an interrupted
    save are removed by the next one. Files get the usual permissions (umask)."""
    if folder.exists() and not folder.is_dir():
        raise PresetWriteError(f"{folder}: exists and is not a folder; fix: choose a folder path")
    try:
        busy = folder.is_dir() and any(folder.iterdir())
    except OSError as exc:
        raise PresetWriteError(f"{folder}: cannot be listed ({exc.strerror}); fix: check the path and its permissions") from None
    if busy and not overwrite:
        raise PresetExistsError(f"{folder}: folder is not empty; fix: choose an empty folder or pass overwrite=True")
    digest = hashlib.sha256(data).hexdigest()
    staged_name = _STAGED_BASES.format(digest)
    files = [{"name": BASES_NAME, "sha256": digest, "size": len(data)}]
    if storage is not None:
        files.append({"name": STORAGE_NAME, "sha256": hashlib.sha256(storage).hexdigest(), "size": len(storage)})
    config = {**config, "schema_version": SCHEMA_VERSION, "files": files}
    validate_config(config, CONFIG_NAME)
    check_semantics(config, CONFIG_NAME)
    staged_config = {**config, "files": [{**config["files"][0], "name": staged_name}]}
    staged_config.pop("storage", None)  # the storage file is replaced after the staged config, before the final one
    try:
        folder.mkdir(parents=True, exist_ok=True)
        previous = _listed_files(folder)
        _write_file(folder, staged_name, data)
        _write_file(folder, CONFIG_NAME, _config_text(staged_config))
        _write_file(folder, BASES_NAME, data)
        if storage is not None:
            _write_file(folder, STORAGE_NAME, storage)
        _write_file(folder, CARD_NAME, card(config).encode("utf-8"))
        _write_file(folder, CONFIG_NAME, _config_text(config))
        _remove_leftovers(folder, previous - {f["name"] for f in files})
    except OSError as exc:
        _remove_leftovers(folder, set(), only_temporary=True)
        raise PresetWriteError(f"{folder}: could not write the preset ({exc.strerror or exc}); fix: check the "
                               "folder's permissions and free space, then save again") from None
    return config


class ChangedDuringRead(Exception):
    """A file the config names is missing or differs: a save may have replaced the preset during the read."""

    def __init__(self, error: PresetFileError):
        super().__init__(str(error))
        self.error = error


def _expected_tensors(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name to shape of every tensor the config's codec needs, and nothing else."""
    codec = CacheCodec.from_dict(config["codec"])
    b = config["base_model"]
    heads, dim = b["num_key_value_heads"], b["head_dim"]
    out: dict[str, tuple[int, ...]] = {}
    for i, layer in enumerate(codec.layers):
        for name in STREAMS:
            stream = layer.stream(name)
            if layer.compressed and stream.projection == "pca":
                out[f"layers.{i}.{name}.mean"] = (heads, dim)
                out[f"layers.{i}.{name}.basis"] = (heads, dim, stream.rank)
                out[f"layers.{i}.{name}.variance"] = (heads, stream.rank)
                if name == "values" and codec.secondary_sinks:
                    out[f"layers.{i}.{name}.norm_median"] = (heads,)
    return out


def _load_tensor_files(folder: Path, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The tensors of every file the config lists, and the basis dtype. Each file is read once, whole, within the
    size the codec implies; its bytes are hashed, its header parsed safely and checked (exact names, dtypes and
    shapes) before any tensor is built."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    expected = _expected_tensors(config)
    b = config["base_model"]
    most = 8 + HEADER_LIMITS.max_bytes + sum(4 * math.prod(s) for s in expected.values())
    tensors: dict[str, Any] = {}
    dtypes: set[str] = set()
    for entry in config["files"]:
        if entry["name"] == STORAGE_NAME:  # read on demand (kvhub.storage_files)
            continue
        path = folder / entry["name"]
        if entry["size"] > most:
            raise PresetTensorError(f"{path}: {entry['size']} bytes, more than the {most} its codec's tensors can "
                                    "take; fix: re-save the preset with kvhub")
        data = read_listed(folder, entry)
        header = safetensors_header(path, data)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or meta.get("format") != BASES_FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else meta
            raise PresetFileError(f"{path}: metadata format is '{str(got)[:40]}', not '{BASES_FORMAT}'; fix: save bases with kvhub")
        for key, info in header.items():
            if key not in expected or key in tensors:
                raise PresetTensorError(f"{path}: unexpected tensor '{key[:80]}'; fix: names are layers.{{i}}.{{keys|values}}."
                                        "{mean|basis|variance} (values.norm_median with secondary_sinks), once each, for the layers and streams the codec projects")
            dtype = info.get("dtype") if isinstance(info, dict) else None
            if dtype not in _ALLOWED_DTYPES:
                raise PresetTensorError(f"{path}: tensor '{key}' has dtype {str(dtype)[:16]}; fix: store bases as F32 or F16")
            shape = tuple(info.get("shape") or ())
            if shape != expected[key]:
                _, i, stream, part = key.split(".")
                raise PresetTensorError(
                    f"{path}: layer {i} {stream}: {part} is {'x'.join(map(str, shape))} but the model and codec need "
                    f"{'x'.join(map(str, expected[key]))} (heads={b['num_key_value_heads']}, head_dim={b['head_dim']}, "
                    f"rank={expected[key][-1]}); fix: use bases fitted for this model and codec"
                )
            if key.endswith(".basis"):
                dtypes.add(dtype)
            tensors[key] = None
        try:
            tensors.update(load(data))
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise PresetFileError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:160]}); "
                                  "fix: re-download the preset") from None
    missing = [k for k in expected if k not in tensors]
    if missing:
        where = folder / config["files"][0]["name"]
        raise PresetTensorError(f"{where}: tensor '{missing[0]}' is missing; fix: re-save the preset with kvhub")
    return tensors, "F32" if "F32" in dtypes else "F16"


def read_listed(folder: Path, entry: dict[str, Any]) -> bytes:
    """The bytes of a listed file, if its size and sha256 are the config's (else :class:`ChangedDuringRead`)."""
    path = folder / entry["name"]
    real = member_path(folder, entry["name"])
    try:  # non-blocking open, then only a regular file is read: a FIFO in its place would block the read forever
        with os.fdopen(os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise PresetFileError(f"{path}: not a regular file (a pipe, device or folder); fix: re-download or "
                                      "re-save the preset")
            data = f.read(entry["size"] + 1)
    except FileNotFoundError:
        raise ChangedDuringRead(PresetFileError(
            f"{path}: listed in {CONFIG_NAME} but missing; fix: re-download or re-save the preset")) from None
    except OSError as exc:
        raise PresetFileError(f"{path}: cannot be read ({exc.strerror}); fix: check the file and its permissions") from None
    if len(data) != entry["size"]:
        size = f"more than {entry['size']}" if len(data) > entry["size"] else str(len(data))
        raise ChangedDuringRead(PresetFileError(
            f"{path}: {size} bytes but {CONFIG_NAME} says {entry['size']} (truncated or replaced); fix: re-download the preset"))
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ChangedDuringRead(PresetFileError(
            f"{path}: sha256 {digest[:12]}... does not match {CONFIG_NAME} ({entry['sha256'][:12]}...); "
            "fix: the file is corrupted or was edited: re-download the preset"))
    return data


def safetensors_header(path: Path, data: bytes) -> dict[str, Any]:
    """The safetensors header of ``data``, its length bounded before it is read, parsed with :mod:`kvhub.safe_json`
    (so duplicate names, NaN and deep nesting are refused, which safetensors itself would accept or mishandle)."""
    (length,) = struct.unpack("<Q", data[:8]) if len(data) >= 8 else (len(data) + 1,)
    if length > min(HEADER_LIMITS.max_bytes, len(data) - 8):
        raise PresetFileError(f"{path}: not a readable safetensors file (header of {length} bytes in a {len(data)}-byte "
                              f"file, at most {HEADER_LIMITS.max_bytes}); fix: re-download the preset")
    header = loads(data[8 : 8 + length], f"{path}: not a readable safetensors file: its header", PresetFileError, HEADER_LIMITS)
    if not isinstance(header, dict):
        raise PresetFileError(f"{path}: not a readable safetensors file (its header is not an object); fix: re-download the preset")
    return header


def _config_text(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


_TEMP_PREFIX = ".kvhub-"
_TEMP_SUFFIX = ".tmp"


def _write_file(folder: Path, name: str, data: bytes) -> None:
    """Replace ``folder/name`` by ``data`` in one ``os.replace`` (a link at that name is replaced, not followed).
    The temporary file is created like any new file (mode 0666 less the umask) and removed on failure."""
    tmp = folder / f"{_TEMP_PREFIX}{secrets.token_hex(8)}{_TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _listed_files(folder: Path) -> set[str]:
    """Files the preset now in ``folder`` lists (none if there is no valid preset): the only ones a save removes."""
    try:
        return {f["name"] for f in read_config(folder)["files"]}
    except PresetError:
        return set()


def _remove_leftovers(folder: Path, listed: set[str], only_temporary: bool = False) -> None:
    """Remove what a save wrote and no longer needs: temporary files, staged bases, and the tensor files the
    previous config listed. Nothing else; best effort (a file that cannot be removed stays, harmlessly)."""
    staged = re.compile(r"bases\.[0-9a-f]{64}\.safetensors")
    temp = re.compile(re.escape(_TEMP_PREFIX) + r"[0-9a-f]{16}" + re.escape(_TEMP_SUFFIX))
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return
    for name in names:
        ours = temp.fullmatch(name) or (not only_temporary and (staged.fullmatch(name) or name in listed))
        if ours:
            try:
                os.unlink(folder / name)
            except OSError:
                pass
