"""``KVPreset``: a codec plus its fitted bases, saved as a folder that is identical on disk and in a Hub repo.

Save, load and publish live here and nowhere else (as ``ModelHubMixin`` does for models). Every problem a user can
hit surfaces as a :class:`~kvhub.errors.PresetError` subclass whose one-line message names the file, the field and
the fix; nothing is half-written: a preset is written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .codec import CacheCodec, ModelShape
from .errors import (
    CodecError,
    PresetError,
    PresetExistsError,
    PresetFileError,
    PresetFormatError,
    PresetModelMismatchError,
    PresetTensorError,
)
from .schema import SCHEMA_VERSION, validate_config

CONFIG_NAME = "kvhub_preset.json"
BASES_NAME = "bases.safetensors"
BASES_FORMAT = "kvhub-bases/1"
_ALLOWED_DTYPES = ("F32", "F16")
_PARTS = ("mean", "basis", "variance")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise PresetFileError(f"{folder}: no such preset folder; fix: pass a folder holding {CONFIG_NAME}")
    if not path.is_file():
        raise PresetFileError(f"{path}: missing; fix: a preset folder needs {CONFIG_NAME} (kvhub tune writes one)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise PresetFormatError(f"{path}: not UTF-8 text ({exc.reason}); fix: restore the file") from exc
    except json.JSONDecodeError as exc:
        raise PresetFormatError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; fix: correct the JSON") from exc
    validate_config(config, str(path))
    return config


@dataclass
class KVPreset:
    """A validated preset config and its bases. Build one with :meth:`from_pretrained` or :meth:`create`."""

    config: dict[str, Any]
    bases: Any  # kvhub.bases.Bases (torch is imported lazily)
    path: Path | None = None

    # --- views ----------------------------------------------------------------------------------------------
    @property
    def codec(self) -> CacheCodec:
        return CacheCodec.from_dict(self.config["codec"])

    @property
    def metrics(self) -> dict[str, Any] | None:
        return self.config.get("metrics")

    @property
    def base_model(self) -> dict[str, Any]:
        return self.config["base_model"]

    @property
    def shape(self) -> ModelShape:
        b = self.base_model
        return ModelShape(b["num_hidden_layers"], b["num_key_value_heads"], b["head_dim"])

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        model_config: Any,
        codec: CacheCodec,
        bases: Any,
        calibration: dict[str, Any],
        model_id: str,
        revision: str | None = None,
        provenance: str | None = None,
        metrics: dict[str, Any] | None = None,
        license: str | None = None,
    ) -> "KVPreset":
        """A new preset for a model from calibrated (variance-ordered) bases: the codec is checked against the model,
        and the bases are cut to the codec's ranks and rotated within each segment (see ``rotate_segments``)."""
        shape = ModelShape.from_config(model_config)
        codec.check(shape)
        kept = bases.rotated_for(codec, shape)
        base_model: dict[str, Any] = {
            "id": model_id,
            "revision": revision,
            "architecture": (getattr(model_config, "architectures", None) or ["unknown"])[0],
            "num_hidden_layers": shape.num_layers,
            "num_key_value_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
        }
        if provenance:
            base_model["provenance"] = provenance
        config: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kvhub_version": __version__,
            "base_model": base_model,
            "codec": codec.to_dict(),
            "calibration": calibration,
            "metrics": metrics,
            "files": [],
        }
        if license:
            config["license"] = license
        return cls(config, kept)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        *,
        cache_dir: str | None = None,
        token: str | None = None,
        endpoint: str | None = None,
        local_files_only: bool = False,
    ) -> "KVPreset":
        """Load a preset from a local folder, a Hub repo id, or a base-model name known to the registry."""
        folder = Path(path_or_repo_id)
        if not folder.exists():
            from .hub_presets import download_preset

            folder = download_preset(
                str(path_or_repo_id), revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint,
                local_files_only=local_files_only,
            ).folder
        return cls.load_folder(folder)

    @classmethod
    def load_folder(cls, folder: Path) -> "KVPreset":
        folder = Path(folder)
        config = _read_config(folder)
        tensors = _load_tensor_files(folder, config)
        from .bases import Bases

        bases = Bases.from_tensors(tensors)
        preset = cls(config, bases, folder)
        preset._check_bases(str(folder / config["files"][0]["name"]))
        return preset

    def _check_bases(self, where: str) -> None:
        try:
            codec = self.codec
            codec.check(self.shape)
            self.bases = self.bases.for_codec(codec, self.shape)
        except CodecError as exc:
            raise PresetTensorError(f"{where}: {exc}") from exc

    def validate(self) -> None:
        """Re-check the config against the schema and the bases against the codec (raises PresetError)."""
        validate_config(self.config, CONFIG_NAME)
        self._check_bases(BASES_NAME)

    # --- saving ---------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write config, bases and model card into ``folder`` atomically (temp folder, then rename)."""
        from safetensors.torch import save_file

        from .card import model_card

        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise PresetExistsError(f"{folder}: folder is not empty; fix: choose an empty folder or pass overwrite=True")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            meta = {"format": BASES_FORMAT, "base_model": self.base_model["id"], "schema_version": SCHEMA_VERSION}
            save_file(self.bases.to_tensors(), str(staging / BASES_NAME), metadata=meta)
            path = staging / BASES_NAME
            self.config["files"] = [{"name": BASES_NAME, "sha256": sha256_file(path), "size": path.stat().st_size}]
            validate_config(self.config, CONFIG_NAME)
            (staging / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
            (staging / "README.md").write_text(model_card(self.config), encoding="utf-8")
            _swap_into_place(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.path = folder
        return folder

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool = False,
                    token: str | None = None, branch: str | None = None, create_pr: bool = False,
                    endpoint: str | None = None):
        """Publish this preset as one commit of ``repo_id`` (created if missing), as ``ModelHubMixin.push_to_hub``
        does: saved into a temporary folder, loaded back (a broken preset never leaves), uploaded with the model
        card generated from the config. Returns the ``CommitInfo``."""
        from .hub_presets import push_preset

        path = self.path
        with tempfile.TemporaryDirectory(prefix="kvhub-push-") as tmp:
            try:
                folder = self.save_pretrained(Path(tmp) / "preset")
            finally:
                self.path = path
            return push_preset(folder, repo_id, revision=branch, create_pr=create_pr, token=token, endpoint=endpoint,
                               private=private, commit_message=commit_message)

    # --- use ------------------------------------------------------------------------------------------------
    def check_model(self, model_config: Any, model_name: str | None = None, allow_name_mismatch: bool = False) -> None:
        """Raise :class:`PresetModelMismatchError` if the preset was made for another model."""
        got = ModelShape.from_config(model_config)
        want = self.shape
        for field, a, b in (
            ("num_hidden_layers", want.num_layers, got.num_layers),
            ("num_key_value_heads", want.num_kv_heads, got.num_kv_heads),
            ("head_dim", want.head_dim, got.head_dim),
        ):
            if a != b:
                raise PresetModelMismatchError(
                    f"{CONFIG_NAME}: base_model.{field} is {a} but the model has {b}; fix: use a preset made for "
                    f"this model (this one is for {self.base_model['id']})"
                )
        if model_name and not allow_name_mismatch and not Path(model_name).exists():
            if model_name.lower() != self.base_model["id"].lower():
                raise PresetModelMismatchError(
                    f"{CONFIG_NAME}: base_model.id is '{self.base_model['id']}' but the model is '{model_name}'; "
                    "fix: use that model's preset, or pass allow_name_mismatch=True if they share weights"
                )

    def build_cache(self, model: Any, allow_name_mismatch: bool = False):
        """A fresh :class:`~kvhub.cache.CompressedCache` for ``model`` (one per generation). The model is not
        changed: run it inside ``with kvhub.compressed_attention(model):`` to decode from the codes directly;
        outside that block the cache rebuilds K/V for the model's own kernel (same results, slower)."""
        from .cache import CompressedCache

        self.check_model(model.config, getattr(model.config, "_name_or_path", None), allow_name_mismatch)
        return CompressedCache(model.config, self.codec, self.bases)


def _load_tensor_files(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, Any] = {}
    for entry in config["files"]:
        path = folder / entry["name"]
        if not path.is_file():
            raise PresetFileError(f"{path}: listed in {CONFIG_NAME} but missing; fix: re-download or re-save the preset")
        size = path.stat().st_size
        if size != entry["size"]:
            raise PresetFileError(
                f"{path}: {size} bytes but {CONFIG_NAME} says {entry['size']} (truncated or replaced); fix: re-download the preset"
            )
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise PresetFileError(
                f"{path}: sha256 {digest[:12]}... does not match {CONFIG_NAME} ({entry['sha256'][:12]}...); "
                "fix: the file is corrupted or was edited: re-download the preset"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != BASES_FORMAT:
                    raise PresetFileError(
                        f"{path}: metadata format is '{meta.get('format')}', not '{BASES_FORMAT}'; fix: save bases with kvhub"
                    )
                for key in f.keys():
                    dtype = str(f.get_slice(key).get_dtype())
                    if dtype not in _ALLOWED_DTYPES:
                        raise PresetTensorError(f"{path}: tensor '{key}' has dtype {dtype}; fix: store bases as F32 or F16")
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise PresetFileError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]}); fix: re-download the preset") from exc
    where = folder / config["files"][0]["name"]
    bad = [k for k in tensors if len(k.split(".")) != 4 or k.split(".")[2] not in ("keys", "values")
           or k.split(".")[3] not in _PARTS or not k.split(".")[1].isdigit()]
    if bad:
        raise PresetTensorError(f"{where}: unexpected tensor '{bad[0]}'; fix: names are layers.{{i}}.{{keys|values}}.{{mean|basis|variance}}")
    for stream in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        for part in _PARTS:
            if f"{stream}.{part}" not in tensors:
                raise PresetTensorError(f"{where}: tensor '{stream}.{part}' is missing; fix: re-save the preset with kvhub")
    return tensors


def _swap_into_place(staging: Path, folder: Path) -> None:
    """Replace ``folder`` by ``staging`` with renames only, so readers see the old preset or the new one."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    backup = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    os.replace(folder, backup)
    try:
        os.replace(staging, folder)
    except OSError:
        os.replace(backup, folder)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def load_preset_cache(preset: str | KVPreset, model: Any = None, device: str | None = None, **kwargs: Any):
    """The one-liner: ``cache = load_preset_cache("org/preset", model=model)`` then
    ``model.generate(input_ids, past_key_values=cache)``. Without ``model`` the preset's base model is loaded."""
    if not isinstance(preset, KVPreset):
        preset = KVPreset.from_pretrained(preset, **kwargs)
    if model is None:
        from .models import load_model

        model, _ = load_model(preset.base_model["id"], device=device)
    cache = preset.build_cache(model)
    return cache


__all__ = ["KVPreset", "load_preset_cache", "CONFIG_NAME", "BASES_NAME", "PresetError"]
