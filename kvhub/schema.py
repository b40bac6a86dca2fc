"""The JSON Schemas in ``kvhub/schemas/`` (also at the repo root as ``schemas/``) are the single source of truth for
the preset and registry formats; this module only loads them and turns the first violation into one clear line."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from .errors import PresetFormatError

SCHEMA_VERSION = "1.1"
# 1.0: F32 bases in bases.safetensors. 1.1: F16 basis columns, tensor files under content-addressed names.
SUPPORTED_SCHEMA_VERSIONS = ("1.0", "1.1")
# A hostile document can violate a schema hundreds of thousands of times; the message names the first few only.
_ERRORS_EXAMINED = 20
_MESSAGE_CHARS = 200


@cache
def load_schema(name: str) -> dict[str, Any]:
    return json.loads(resources.files("kvhub").joinpath("schemas", f"{name}.schema.json").read_text(encoding="utf-8"))


def _shorten(text: str, limit: int = _MESSAGE_CHARS) -> str:
    """``text``, or its start and end around the count of what was cut (jsonschema quotes the whole value first)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}...({len(text) - 2 * half} characters)...{text[-half:]}"


def schema_errors(instance: Any, name: str, limit: int = _ERRORS_EXAMINED) -> list[str]:
    """Up to ``limit`` violations of schema ``name`` (validation stops there), as ``'field.path: message'`` lines,
    most specific first, each shortened so that a huge wrong value cannot make a huge message."""
    from itertools import islice

    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    validator = Draft202012Validator(load_schema(name))
    errors = sorted(islice(validator.iter_errors(instance), limit), key=lambda e: [str(p) for p in e.absolute_path])
    lines = []
    for err in errors:
        err = best_match([err]) if not err.context else best_match(err.context)
        where = ".".join(_shorten(str(p), 64) for p in err.absolute_path) or "(top level)"
        lines.append(f"{where}: {_shorten(err.message)}")
    return lines


def validate_config(config: Any, where: str, error: type[Exception] = PresetFormatError, name: str = "preset") -> None:
    """Raise ``error`` naming ``where`` and the first offending field if ``config`` violates schema ``name``."""
    if isinstance(config, dict) and name == "preset" and config.get("schema_version") not in (None, *SUPPORTED_SCHEMA_VERSIONS):
        raise error(
            f"{where}: schema_version '{_shorten(str(config['schema_version']), 40)}' is not supported (this kvhub "
            f"reads {', '.join(SUPPORTED_SCHEMA_VERSIONS)}); fix: upgrade kvhub or re-save the preset"
        )
    problems = schema_errors(config, name)
    if problems:
        raise error(f"{where}: {problems[0]}; fix: correct that field (see schemas/{name}.schema.json)")
