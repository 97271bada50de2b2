"""The progress of a long command: a bar with a total and the time left in a terminal, plain lines when piped.

Every long-running library function takes ``progress(done, total)`` (units of work: examples, gradients, steps,
batches), called after each chunk; :class:`Progress` renders it. In a terminal it is a transient rich bar; with
the output piped or redirected it prints ``WHAT: DONE/TOTAL (P%), E s, about L s left`` every
:data:`PLAIN_EVERY_SECONDS` and, after such a line, once when the work is done, so a log shows that a long command
is alive (a short one prints none). Quiet (``--json``, a torchrun rank > 0) prints nothing. The commands hand it a
stderr console: their results stay alone on stdout.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from fnclass.cli.errors import speaks

PLAIN_EVERY_SECONDS = 15.0  # the interval of the plain lines (tests set it to 0: every update)


class Progress:
    """``with Progress(console, "per-example gradients") as progress: work(progress=progress)``."""

    def __init__(self, console: Console, what: str, *, quiet: bool = False):
        self.console, self.what = console, what
        self.quiet = quiet or not speaks()
        self.bar = self.task = None
        self.start = self.last = time.perf_counter()
        self.said = self.finished = False

    def __enter__(self) -> Progress:
        if not self.quiet and self.console.is_terminal:
            self.bar = RichProgress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    TextColumn("left"), TimeRemainingColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=None)
        self.start = self.last = time.perf_counter()
        return self

    def __call__(self, done: int, total: int | None = None) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
            return
        now = time.perf_counter()
        over = total is not None and done >= total
        if over and (self.finished or not self.said) or not over and now - self.last < PLAIN_EVERY_SECONDS:
            return
        self.last, self.finished, self.said = now, over, True
        self.console.print(plain_line(self.what, done, total, now - self.start), highlight=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def plain_line(what: str, done: int, total: int | None, elapsed: float) -> str:
    """``per-example gradients: 1,200/2,000 (60%), 12 s, about 8 s left`` (no total: the count and the time)."""
    if not total:
        return f"{what}: {done:,}, {elapsed:.0f} s"
    left = elapsed * (total - done) / done if done else None
    tail = "done" if done >= total else f"about {left:.0f} s left" if left is not None else "starting"
    return f"{what}: {done:,}/{total:,} ({done / total:.0%}), {elapsed:.0f} s, {tail}"
