"""The ``stemforge`` command: a root that finds subcommands by entry point.

Each stage registers its commands under the ``stemforge.commands`` entry-point group in
pyproject.toml; the root imports a command's module only when that command is listed or
run, so ``stemforge --help`` never loads torch or abTEM. Command modules keep their heavy
imports inside the command functions for the same reason.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points, version

import click

from stemforge.core.errors import StemforgeError

GROUP = "stemforge.commands"


class LazyGroup(click.Group):
    """A click group whose commands are entry points, loaded on first use."""

    def _entry_points(self) -> dict[str, object]:
        return {ep.name: ep for ep in entry_points(group=GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._entry_points())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        ep = self._entry_points().get(cmd_name)
        return None if ep is None else ep.load()  # type: ignore[attr-defined]


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("stemforge"), prog_name="stemforge")
def cli() -> None:
    """stemforge: simulate, train and analyse 4D-STEM diffraction data.

    Run `stemforge COMMAND --help` for the options of each command.
    """


def main() -> None:
    """Console entry point: stemforge errors print as one clear line, not a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except StemforgeError as exc:
        if os.environ.get("STEMFORGE_DEBUG"):
            raise
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
