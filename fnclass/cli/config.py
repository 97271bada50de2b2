"""``fnclass config show``: the fully resolved config a run would use."""

from __future__ import annotations

import click

from fnclass.cli import options
from fnclass.cli.errors import one_line_errors
from fnclass.config import config_to_toml, load_config, shipped_configs


@click.group(help=f"""Show run configs (shipped: {options.shipped_names()}).

    \b
    Example:
      fnclass config show --config fast95 --set train.epochs=4
    """)
def config() -> None:
    """Show run configs."""


@config.command("show")
@options.config_options
@one_line_errors
def show(config_path, overrides) -> None:
    """Print the fully resolved config (base configs merged, overrides applied, model defaults filled) as TOML.

    \b
    Example:
      fnclass config show --config fast --set model.name=tiny
    """
    from fnclass.models import resolve_config

    source = config_path if config_path is not None else "defaults"
    resolved = resolve_config(load_config(config_path, list(overrides)), source=source)
    shown = " ".join(text if text.isprintable() else repr(text) for text in overrides)  # one comment line
    click.echo(f"# {source}{' with --set ' + shown if overrides else ''}; shipped configs: "
               f"{', '.join(shipped_configs())}")
    click.echo(config_to_toml(resolved), nl=False)
