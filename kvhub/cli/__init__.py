"""The ``kvhub`` command line. Each command group lives in its own module of this package; none imports torch at
module level, so ``kvhub --help`` and ``kvhub --version`` start instantly. Every :class:`~kvhub.errors.KVHubError`
becomes one ``error: ...`` line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import KVHubError
from ..text_safety import printable


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvhub")
def cli() -> None:
    """kvhub: calibrated, really-compressed KV caches for open LLMs.

    Pull a preset for a model, check it, measure it, tune a new one, publish it."""


def _register() -> None:
    from . import backends, demo, evaluate, hub, preset, registry, tune

    for module in (demo, preset, evaluate, tune, hub, registry, backends):
        for command in module.COMMANDS:
            cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="kvhub", standalone_mode=False)
    except KVHubError as exc:
        click.echo(f"error: {printable(exc)}", err=True)  # one line, no escape sequences from a file
        return 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


def run() -> None:
    sys.exit(main())


_register()
