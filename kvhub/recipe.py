"""Recipes: how to make a preset for a model before its bases exist.

A recipe names the model and the codec to fit (or the tuning target), and is what a contributor commits under
``presets/<org>--<name>/recipe.json`` before a GPU run measures it. The inherited zoo's presets are recipes too:
they record a rank and bit width but ship no bases, so importing one yields a recipe, never a usable preset.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .codec import CacheCodec, ModelShape
from .errors import PresetFormatError
from .schema import validate_config

RECIPE_NAME = "recipe.json"
_LEGACY_KEYS = {"model", "rank", "target", "bits"}


@dataclass
class Recipe:
    """``target_ppl_delta`` set: ``kvhub tune`` searches the codec. Otherwise the uniform codec described here."""

    model: str
    target_ppl_delta: float | None = None
    key_bits: int = 16
    value_bits: int = 8
    key_rank: int | None = None
    value_rank: int | None = None
    compress_keys: bool = True
    sink: int = 4
    window: int = 0
    calibration_tokens: int = 40960
    notes: str = ""
    claimed: dict[str, Any] | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def codec(self, shape: ModelShape) -> CacheCodec:
        return CacheCodec.uniform(shape, self.key_bits, self.value_bits, self.key_rank, self.value_rank, self.sink,
                                  self.window, compress_keys=self.compress_keys)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v not in (None, {}, "")}
        d["schema_version"] = "1.0"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = RECIPE_NAME) -> "Recipe":
        validate_config(d, where, PresetFormatError, name="recipe")
        return cls(**{k: v for k, v in d.items() if k != "schema_version"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        if path.is_dir():
            path = path / RECIPE_NAME
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
        except json.JSONDecodeError as exc:
            raise PresetFormatError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}; fix: correct the JSON") from exc

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)


def import_legacy_preset(legacy: dict[str, Any], source: str | None = None) -> Recipe:
    """Inherited format ``{"model", "rank", "target": "v", "bits", "compression_ratio", "total_compression",
    "ppl_delta"}`` -> a recipe reproducing it (V-only PCA at that rank and bits, keys fp16, no sink).
    Its numbers are kept as unverified claims."""
    missing = _LEGACY_KEYS - legacy.keys()
    if missing:
        raise PresetFormatError(
            f"{source or 'legacy preset'}: missing {', '.join(sorted(missing))}; fix: pass an inherited-zoo preset JSON "
            '({"model", "rank", "target", "bits", ...})'
        )
    target = str(legacy["target"]).lower()
    if target not in ("v", "k", "kv"):
        raise PresetFormatError(f"{source or 'legacy preset'}: target '{legacy['target']}' is not v, k or kv")
    claims = {k: legacy[k] for k in ("compression_ratio", "total_compression", "ppl_delta") if k in legacy}
    return Recipe(
        model=legacy["model"],
        key_bits=int(legacy["bits"]) if "k" in target else 16,
        value_bits=int(legacy["bits"]) if "v" in target else 16,
        key_rank=int(legacy["rank"]) if "k" in target else None,
        value_rank=int(legacy["rank"]) if "v" in target else None,
        compress_keys="k" in target,
        sink=0,
        window=0,
        calibration_tokens=1024,
        notes=("imported from the inherited zoo: it carries no bases, so they must be fitted "
               "(kvhub tune, or kvhub registry verify on a GPU); its numbers are unverified claims"),
        claimed={"verified": False, **claims} if claims else None,
        source=source,
    )
