"""The CLI's answer to bad input, checked the same way everywhere: exit code 2, one ``error:`` line, no stdout."""

from __future__ import annotations

from click.testing import CliRunner

from fnclass.cli import main


def one_error_line(args: list[str], *expected: str) -> str:
    """Run the CLI: exit code 2, nothing on stdout, one stderr line starting ``error:`` that holds ``expected``."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert result.stdout == "" and len(lines) == 1 and lines[0].startswith("error: "), result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]
