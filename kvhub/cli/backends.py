"""``kvhub backends``: which decode backend runs compressed attention here, what each one handles, and why a faster
one would be passed over (the same declarations :mod:`kvhub.backends` chooses from)."""

from __future__ import annotations

import click

from ..text_safety import printable


@click.command("backends")
@click.option("--markdown", is_flag=True, help="Print the capability table as Markdown (README's table is this).")
def backends_command(markdown: bool) -> None:
    """Show the decode backends, their declared capabilities and which one a decode step gets on CPU and CUDA."""
    from .. import backends

    if markdown:
        click.echo(backends.markdown_table())
        return
    click.echo(f"{backends.ENV}={backends.requested()}")
    for device in ("cpu", "cuda"):
        click.echo(f"a decode step on {device} tensors runs on: {backends.preferred(device)}")
    for row in backends.describe():
        click.echo("")
        for key, value in row.items():
            click.echo(f"  {key}: {printable(value)}")


COMMANDS = [backends_command]
