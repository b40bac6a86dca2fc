"""The JSON Schemas in ``kvhub/schemas/`` (also at the repo root as ``schemas/``) are the single source of truth for
the preset and registry formats; this module only loads them and turns the first violation into one clear line."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from .errors import PresetFormatError

SCHEMA_VERSION = "1.0"


@cache
def load_schema(name: str) -> dict[str, Any]:
    return json.loads(resources.files("kvhub").joinpath("schemas", f"{name}.schema.json").read_text(encoding="utf-8"))


def schema_errors(instance: Any, name: str) -> list[str]:
    """Every violation of schema ``name``, as ``'field.path: message'`` lines, most specific first."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    validator = Draft202012Validator(load_schema(name))
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    lines = []
    for err in errors:
        err = best_match([err]) if not err.context else best_match(err.context)
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        lines.append(f"{where}: {err.message}")
    return lines


def validate_config(config: Any, where: str, error: type[Exception] = PresetFormatError, name: str = "preset") -> None:
    """Raise ``error`` naming ``where`` and the first offending field if ``config`` violates schema ``name``."""
    if isinstance(config, dict) and name == "preset" and config.get("schema_version") not in (None, SCHEMA_VERSION):
        raise error(
            f"{where}: schema_version '{config['schema_version']}' is not supported (this kvhub reads {SCHEMA_VERSION}); "
            "fix: upgrade kvhub or re-save the preset"
        )
    problems = schema_errors(config, name)
    if problems:
        raise error(f"{where}: {problems[0]}; fix: correct that field (see schemas/{name}.schema.json)")
