"""Reading JSON that someone else wrote (preset configs, registry indexes, safetensors headers) without letting it
exhaust memory or time, or smuggle in values that the JSON Schema cannot see.

``json.loads`` accepts documents that are valid for it but hostile for us: ``NaN`` and ``Infinity`` literals (and
``1e999``, which becomes ``inf``), integers of thousands of digits (Python refuses to convert past 4300 with a
ValueError), nesting deep enough to raise RecursionError (here or later in jsonschema), duplicate keys (the last one
silently wins, so two readers can disagree about the same file) and lone surrogates (``"\\ud800"``: a str that
cannot be encoded, so printing or saving it crashes). :func:`loads` refuses every one of these with ``error`` (a
:class:`~kvhub.errors.KVHubError` subclass chosen by the caller) and a one-line message; :func:`read_json_file`
also bounds the file size before reading a byte.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KVHubError


@dataclass(frozen=True)
class JsonLimits:
    """Bounds on a document. The defaults fit every real preset config and registry index many times over."""

    max_bytes: int = 1 << 20  # 1 MiB
    max_depth: int = 32
    max_int_digits: int = 20  # int64 has 19 digits
    max_number_chars: int = 64
    max_items: int = 10_000  # per array or object: a schema check of a huge one costs time before it can fail


DEFAULT_LIMITS = JsonLimits()


class _Refused(ValueError):
    """Raised inside the parser's hooks; turned into the caller's error type with the file name."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"duplicate key {json.dumps(key[:64])} (readers would disagree about its value)")
    return out


def _parse_int(limits: JsonLimits):
    def parse(text: str) -> int:
        if len(text.lstrip("-")) > limits.max_int_digits:
            raise _Refused(f"an integer of {len(text)} digits (at most {limits.max_int_digits} are allowed)")
        return int(text)

    return parse


def _parse_float(limits: JsonLimits):
    def parse(text: str) -> float:
        if len(text) > limits.max_number_chars:
            raise _Refused(f"a number written with {len(text)} characters (at most {limits.max_number_chars})")
        value = float(text)
        if not math.isfinite(value):
            raise _Refused(f"the number {text[:32]} overflows to infinity")
        return value

    return parse


def _parse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows (NaN and Infinity are refused)")


def _check_tree(value: Any, limits: JsonLimits) -> None:
    """Depth and size bounds and encodable strings, iteratively (a recursive walk is what the depth bound protects against)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_string(node)
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > limits.max_depth:
            raise _Refused(f"nesting deeper than {limits.max_depth} levels")
        if len(node) > limits.max_items:
            kind = "an object" if isinstance(node, dict) else "an array"
            raise _Refused(f"{kind} of {len(node)} items (at most {limits.max_items})")
        if isinstance(node, dict):
            for k, v in node.items():
                _check_string(k)
                stack.append((v, depth + 1))
        else:
            stack.extend((v, depth + 1) for v in node)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Refused(f"a lone surrogate \\u{ord(text[exc.start]):04x} in a string (not valid Unicode)") from None


def loads(data: str | bytes, where: str, error: type[KVHubError], limits: JsonLimits = DEFAULT_LIMITS) -> Any:
    """Parse ``data`` (UTF-8 bytes or text) within ``limits``; raise ``error`` naming ``where`` and the fix."""
    fix = "fix: restore the file (kvhub writes none of these)"
    if len(data) > limits.max_bytes:
        raise error(f"{where}: {len(data)} bytes, more than the {limits.max_bytes} allowed; {fix}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); {fix}") from None
    try:
        value = json.loads(data, object_pairs_hook=_no_duplicates, parse_int=_parse_int(limits),
                           parse_float=_parse_float(limits), parse_constant=_parse_constant)
        _check_tree(value, limits)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; fix: correct the JSON") from None
    except _Refused as exc:
        raise error(f"{where}: {exc}; {fix}") from None
    except RecursionError:
        raise error(f"{where}: nesting deeper than {limits.max_depth} levels; {fix}") from None
    return value


def read_json_file(path: str | os.PathLike, where: str, error: type[KVHubError],
                   limits: JsonLimits = DEFAULT_LIMITS) -> Any:
    """:func:`loads` on the file at ``path``, reading at most ``limits.max_bytes + 1`` bytes of it."""
    try:
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as exc:
        raise error(f"{where}: cannot be read ({exc.strerror or exc}); fix: check the file and its permissions") from None
    if len(data) > limits.max_bytes:
        size = Path(path).stat().st_size
        raise error(f"{where}: {size} bytes, more than the {limits.max_bytes} allowed; fix: restore the file (kvhub writes none this large)")
    return loads(data, where, error, limits)


__all__ = ["JsonLimits", "DEFAULT_LIMITS", "loads", "read_json_file"]
