"""``KVPreset``: a codec plus its fitted bases, saved as a folder that is identical on disk and in a Hub repo.

The object API: create, load, save and publish a preset (as ``ModelHubMixin`` does for models). The file format
(bounded reads, hashing, atomic writes, file names) is :mod:`kvhub.preset_files`, the Hub transport
:mod:`kvhub.hub_presets`; this module only delegates to them. Every problem a user can hit surfaces as a
:class:`~kvhub.errors.PresetError` subclass whose one-line message names the file, the field and the fix.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .codec import CacheCodec, ModelShape
from .errors import PresetError, PresetFileError, PresetModelMismatchError
from .hub_presets import download_preset, push_preset
from .preset_files import (
    BASES_FORMAT,
    BASES_NAME,
    CARD_NAME,
    CONFIG_NAME,
    check_semantics,
    checked_bases,
    member_path,
    read_preset,
    write_preset,
)
from .schema import SCHEMA_VERSION, validate_config


@dataclass
class KVPreset:
    """A validated preset config and its bases. Build one with :meth:`from_pretrained` or :meth:`create`."""

    config: dict[str, Any]
    bases: Any  # kvhub.bases.Bases (torch is imported lazily)
    path: Path | None = None
    basis_dtype: str = "F16"  # how the basis is stored; a preset read from an F32 file is saved as F32 again
    storage_codec: Any = None  # kvhub.storage_codec.StorageCodec once loaded or fitted (see ``storage``)

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
    def storage(self) -> Any:
        """The storage codec for KV at rest (:mod:`kvhub.storage_codec`), or None when the preset has none. Read
        from the folder on first use: it is larger than the bases and only a storage-form serde needs it."""
        if self.storage_codec is None and "storage" in self.config and self.path is not None:
            from .storage_files import read_storage

            self.storage_codec = read_storage(self.path, self.config)
        return self.storage_codec

    def with_storage(self, codec: Any, section: dict[str, Any]) -> "KVPreset":
        """Attach a fitted storage codec and its config section (:func:`kvhub.storage_fit.storage_section`);
        :meth:`save_pretrained` writes both."""
        self.storage_codec = codec
        self.config = {**self.config, "storage": section}
        return self

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
        and the bases are cut to the codec's ranks, rotated within each segment (see ``rotate_segments``) and
        rounded to the fp16 they are stored in, so ``preset.bases`` is exactly what a reader of the saved preset gets."""
        import torch

        shape = ModelShape.from_config(model_config)
        codec.check(shape)
        kept = bases.rotated_for(codec, shape).rounded(torch.float16)
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
            folder = download_preset(
                str(path_or_repo_id), revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint,
                local_files_only=local_files_only,
            ).folder
        return cls.load_folder(folder)

    @classmethod
    def load_folder(cls, folder: str | os.PathLike) -> "KVPreset":
        """Read and check the preset in ``folder`` (:func:`~kvhub.preset_files.read_preset`)."""
        folder = Path(folder)
        files = read_preset(folder)
        return cls(files.config, files.bases, folder, files.basis_dtype)

    def preset_files(self) -> dict[str, Path]:
        """The preset's own files, name to real path: the config, the model card (if present) and every tensor
        file the config lists, each checked not to leave the folder. What ``kvhub push`` may upload, and the only
        files :meth:`save_pretrained` replaces."""
        if self.path is None:
            raise PresetFileError("this preset has no folder yet; fix: save_pretrained() it first")
        names = [CONFIG_NAME, *(f["name"] for f in self.config["files"])]
        if (self.path / CARD_NAME).exists():
            names.insert(1, CARD_NAME)
        return {name: member_path(self.path, name) for name in names}

    def validate(self) -> None:
        """Re-check the config against the schema and the bases against the codec (raises PresetError)."""
        validate_config(self.config, CONFIG_NAME)
        check_semantics(self.config, CONFIG_NAME)
        self.bases = checked_bases(self.config, self.bases, BASES_NAME)

    # --- saving ---------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the config, the bases and the model card into ``folder``, replacing only those files, in an order
        that keeps every reader consistent (:func:`~kvhub.preset_files.write_preset`)."""
        import torch
        from safetensors.torch import save as serialize

        from .card import model_card

        folder = Path(folder)
        dtype = torch.float16 if self.basis_dtype == "F16" else torch.float32
        meta = {"format": BASES_FORMAT, "base_model": self.base_model["id"], "schema_version": SCHEMA_VERSION}
        data = serialize(self.bases.to_tensors(dtype), metadata=meta)
        storage = None
        if self.storage is not None:
            from .storage_files import storage_bytes

            storage = storage_bytes(self.storage)
        self.config = write_preset(folder, self.config, data, model_card, overwrite, storage)
        self.path = folder
        return folder

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool = False,
                    token: str | None = None, branch: str | None = None, create_pr: bool = False,
                    endpoint: str | None = None):
        """Publish this preset as one commit of ``repo_id`` (created if missing), as ``ModelHubMixin.push_to_hub``
        does: saved into a temporary folder, loaded back (a broken preset never leaves), uploaded with the model
        card generated from the config. Returns the ``CommitInfo``."""
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
        outside that block the cache rebuilds K/V for the model's own kernel (same results, slower). Bases whose
        keys or values would overflow the model's dtype are refused (:meth:`~kvhub.bases.Bases.check_dtype`)."""
        from .cache import CompressedCache

        self.check_model(model.config, getattr(model.config, "_name_or_path", None), allow_name_mismatch)
        self.bases.check_dtype(self.codec, model.dtype)
        return CompressedCache(model.config, self.codec, self.bases)


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


__all__ = ["KVPreset", "load_preset_cache", "CONFIG_NAME", "BASES_NAME", "CARD_NAME", "PresetError"]
