"""Options several commands share."""

from __future__ import annotations

import click


def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a device this machine lacks while the command line is parsed, before anything is loaded; the value
    itself is kept (None stays None, so the command a report records to reproduce a run names no device)."""
    if value is not None:
        from ..models import resolve_device

        resolve_device(value)
    return value


def device_option(f):
    return click.option("--device", default=None, callback=_check_device,
                        help="cpu, cuda, cuda:1, mps, auto (accelerate's device_map) ... (default: cuda when torch "
                             "sees a GPU, else cpu).")(f)
