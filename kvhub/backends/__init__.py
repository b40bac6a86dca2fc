"""Decode backends, one class per module (the pattern of :mod:`kvhub.quantizers`), and the choice between them.

``KVHUB_KERNELS`` picks: ``auto`` (default) takes the first backend, in the order Triton, C, PyTorch, that is
available for the tensors' device and supports the call; ``triton``, ``native`` or ``torch`` asks for that one. A
backend that cannot take a call is passed over for the PyTorch backend, which handles every call; it never computes
something else. Every pass-over of a requested or available backend is recorded with its reason: once per distinct
decision in the ``kvhub`` logger (DEBUG), in every :func:`recording` block, and :func:`describe` says what a device
would use before anything runs (``kvhub backends`` prints it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import KVHubError
from .base import Capabilities, DecodeBackend, DecodeCall
from .native import NativeBackend
from .torch_ops import TorchBackend
from .triton_kernels import TritonBackend

ENV = "KVHUB_KERNELS"
BACKENDS: dict[str, DecodeBackend] = {b.name: b for b in (TritonBackend(), NativeBackend(), TorchBackend())}
CHOICES = ("auto", *BACKENDS)
FALLBACK = BACKENDS["torch"]

log = logging.getLogger("kvhub")


class BackendChoiceError(KVHubError, ValueError):
    """``KVHUB_KERNELS`` names no backend."""


def requested() -> str:
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise BackendChoiceError(f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}; fix: set one of them or unset {ENV}")
    return choice


@dataclass
class DecodeLog:
    """What the decode calls inside a :func:`recording` block ran on: ``calls`` counts calls per backend name,
    ``fallbacks`` counts ``(backend, reason)`` for each backend passed over."""

    calls: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)


_ACTIVE = threading.local()
_LOGGED: set = set()
_LOGGED_LOCK = threading.Lock()


@contextmanager
def recording() -> Iterator[DecodeLog]:
    """Record, in this thread, which backend served each decode call and which were passed over, and why."""
    stack = _ACTIVE.__dict__.setdefault("stack", [])
    entry = DecodeLog()
    stack.append(entry)
    try:
        yield entry
    finally:
        stack.remove(entry)


def _note(chosen: DecodeBackend, passed: list[tuple[str, str]]) -> None:
    for entry in _ACTIVE.__dict__.get("stack", ()):
        entry.calls[chosen.name] += 1
        entry.fallbacks.update(passed)
    key = (chosen.name, tuple(passed))
    if key not in _LOGGED:
        with _LOGGED_LOCK:
            _LOGGED.add(key)
        detail = "; ".join(f"{name} passed over: {why}" for name, why in passed)
        log.debug("kvhub: compressed attention runs on the %s backend%s", chosen.name, f" ({detail})" if detail else "")


def _candidates(choice: str) -> list[DecodeBackend]:
    return list(BACKENDS.values()) if choice == "auto" else [BACKENDS[choice]]


def choose(call: DecodeCall) -> DecodeBackend:
    """The backend that runs ``call`` (module docstring), recorded."""
    choice = requested()
    passed = []
    device = call.query.device
    for backend in _candidates(choice):
        unavailable = backend.unavailable(device, forced=choice != "auto")
        reason = unavailable or backend.supports(call)
        if reason is None:
            _note(backend, passed)
            return backend
        if choice != "auto" or unavailable is None:  # in auto, another device's backend is no fallback
            passed.append((backend.name, reason))
    _note(FALLBACK, passed)
    return FALLBACK


def preferred(device: torch.device | str) -> str:
    """The backend a decode step (one query token, supported shapes) on ``device`` gets here, following
    ``KVHUB_KERNELS``."""
    device, choice = torch.device(device), requested()
    for backend in _candidates(choice):
        if backend.unavailable(device, forced=choice != "auto") is None:
            return backend.name
    return FALLBACK.name


def describe() -> list[dict[str, str]]:
    """Every backend's declared capabilities, and whether it is available here for CPU and CUDA tensors."""
    rows = []
    for backend in BACKENDS.values():
        row = backend.describe()
        for device in ("cpu", "cuda"):
            why = backend.unavailable(torch.device(device))
            if why is None and device == "cuda" and not torch.cuda.is_available():
                why = "no CUDA device here"
            row[f"here, {device}"] = "yes" if why is None else f"no: {why}"
        rows.append(row)
    return rows


def markdown_table() -> str:
    """The declared capabilities as README's "Which attention runs when" backend table (generated, never typed:
    ``kvhub backends --markdown``; a test holds README to it)."""
    rows = [backend.describe() for backend in BACKENDS.values()]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[key].replace("|", "\\|") for key in header) + " |" for row in rows]
    lines += ["", f"In `{ENV}=auto` (the default) the first backend of this table that is available for the tensors' "
              "device and supports the call runs it; a call no fused backend supports runs on `torch`, and the reason "
              "is recorded (`kvhub backends`, `kvhub.backends.recording()`, the `kvhub` logger at DEBUG)."]
    return "\n".join(lines)


__all__ = ["markdown_table", "BACKENDS", "BackendChoiceError", "Capabilities", "DecodeBackend", "DecodeCall", "DecodeLog", "choose",
           "describe", "preferred", "recording"]
