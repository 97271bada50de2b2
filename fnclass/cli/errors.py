"""One-line errors: bad input is one line on stderr starting ``error:``, with exit code 2 (3: training diverged)."""

from __future__ import annotations

import functools
import os
import sys

import click

from fnclass.errors import InputError


class UsageProblem(click.ClickException):
    """A bad input reported as one line on stderr with exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        if speaks():
            click.echo(f"error: {self.format_message()}", err=True)


def speaks() -> bool:
    """Whether this process prints errors: any process but ranks > 0 of a torchrun job (they would repeat it)."""
    return os.environ.get("RANK", "0") == "0"


class Diverged(UsageProblem):
    """Training diverged: one line, exit code 3 (not bad input: the recipe needs changing)."""

    exit_code = 3


def one_line_errors(command):
    """Turn the library's input errors into one-line messages with exit code 2 (no traceback)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as error:
            raise UsageProblem(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    return wrapper


class OneLineGroup(click.Group):
    """A click group whose usage errors (bad flags, missing arguments) are one line and exit with code 2."""

    def main(self, *args, **kwargs):
        try:
            self._main(*args, **kwargs)
        except SystemExit as exit:
            distributed = sys.modules.get("fnclass.distributed")  # loaded only by commands that can join a job
            if distributed is not None:
                code = exit.code
                if isinstance(code, str):  # what the interpreter would print
                    print(code, file=sys.stderr)
                distributed.leave(code if isinstance(code, int) else 0 if code is None else 1)
            raise

    def _main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            where = error.ctx.command_path if error.ctx else "fnclass"
            if speaks():
                click.echo(f"error: {error.format_message()} (see `{where} --help`)", err=True)
            raise SystemExit(2) from None
        except click.ClickException as error:
            error.show()
            raise SystemExit(error.exit_code) from None
        except click.Abort:
            click.echo("aborted", err=True)
            raise SystemExit(1) from None
        raise SystemExit(result if isinstance(result, int) else 0)
