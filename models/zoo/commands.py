"""``stemforge zoo``: list, inspect, download and verify the pretrained models.

Only click is imported at module level, so that the CLI root lists this command without
loading anything else; each subcommand imports the zoo when it runs (and never torch).
"""

from __future__ import annotations

import json

import click


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def zoo() -> None:
    """Pretrained models by NAME[@VERSION]: list, inspect, download and verify them.

    NAME alone or NAME@latest means the highest released version. STEMFORGE_ZOO_REGISTRY
    adds a registry (a JSON path or an http(s) URL); STEMFORGE_ZOO_CACHE moves the cache.
    """


@zoo.command("list")
def list_() -> None:
    """Table of the models in the zoo, with where each one comes from."""
    from urllib.parse import urlsplit

    from rich.console import Console
    from rich.table import Table

    from stemforge.models.zoo.registry import EMPTY_ZOO_MESSAGE, latest_version, load_registry
    from stemforge.models.zoo.store import local_path

    registry = load_registry()
    if not len(registry):
        click.echo(EMPTY_ZOO_MESSAGE[0].upper() + EMPTY_ZOO_MESSAGE[1:] + ".")
        return
    table = Table(
        title="stemforge model zoo", title_justify="left", caption="* latest: what NAME alone loads"
    )
    for column in ("model", "version", "architecture", "size", "source", "local"):
        table.add_column(column, no_wrap=True)
    table.add_column("metrics", overflow="fold")
    for entry in registry:
        latest = entry.version == latest_version(registry.versions(entry.name))
        table.add_row(
            entry.name,
            entry.version + (" *" if latest else ""),
            entry.architecture,
            _human_bytes(entry.size),
            "embedded" if entry.embedded else urlsplit(entry.url).netloc if entry.url else "cache only",
            "yes" if local_path(entry) else "no",
            ", ".join(f"{key}={_short(value)}" for key, value in entry.metrics.items()),
        )
    Console().print(table)


@zoo.command()
@click.argument("name")
def info(name: str) -> None:
    """Registry entry of NAME[@VERSION] as JSON, with the file's metadata when it is local."""
    from stemforge.models.zoo.registry import resolve
    from stemforge.models.zoo.store import local_path, read_metadata

    entry = resolve(name)
    path = local_path(entry)
    document = {"spec": entry.spec, **entry.to_json(), "registry": entry.origin}
    document["path"] = None if path is None else str(path)
    if path is not None:
        document["metadata"] = read_metadata(path)
    click.echo(json.dumps(document, indent=2))


@zoo.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Replace a modified cached copy by a fresh, hash-checked download.")
def pull(name: str, force: bool) -> None:
    """Download NAME[@VERSION] into the cache (hash checked) and print its path."""
    from stemforge.models.zoo.store import pull as pull_model

    click.echo(str(pull_model(name, force=force)))


@zoo.command()
@click.argument("name")
def verify(name: str) -> None:
    """Re-hash the local file of NAME[@VERSION] against its registry: OK, or an error."""
    from stemforge.models.zoo.registry import resolve
    from stemforge.models.zoo.store import verify as verify_model

    entry = resolve(name)
    path = verify_model(entry)
    click.echo(f"OK {entry.spec} sha256:{entry.sha256} {path}")
