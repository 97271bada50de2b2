"""The ``fnclass`` command line: a thin click shell over the library, rendered with rich."""

from __future__ import annotations

import functools
import sys

import click

from fnclass.config import ConfigError
from fnclass.data import DataError


class UsageProblem(click.ClickException):
    """A bad input reported as one line on stderr with exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def one_line_errors(command):
    """Turn the library's input errors into one-line messages with exit code 2 (no traceback)."""
    from fnclass.checkpoint import CheckpointError

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ConfigError, DataError, CheckpointError) as error:
            raise UsageProblem(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    return wrapper


class OneLineGroup(click.Group):
    """A click group whose usage errors (bad flags, missing arguments) are one line and exit with code 2."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            where = error.ctx.command_path if error.ctx else "fnclass"
            click.echo(f"error: {error.format_message()} (see `{where} --help`)", err=True)
            raise SystemExit(2) from None
        except click.ClickException as error:
            error.show()
            raise SystemExit(error.exit_code) from None
        except click.Abort:
            click.echo("aborted", err=True)
            raise SystemExit(1) from None
        raise SystemExit(result if isinstance(result, int) else 0)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fnclass")
def main() -> None:
    """fnclass: CIFAR-10 classification with pure functions over pytrees.

    \b
    Example:
      fnclass train --config configs/cpu.toml --data-dir ../shared/data/cifar10
    """


def _register() -> None:
    """Attach the sub-commands (imported here so `fnclass --help` stays fast)."""
    from fnclass.cli import data, export, grads, train

    main.add_command(train.train)
    main.add_command(train.evaluate)
    main.add_command(train.info)
    main.add_command(data.data)
    main.add_command(grads.grads)
    main.add_command(export.export)
    main.add_command(export.predict_command)


_register()

if __name__ == "__main__":
    sys.exit(main())
