"""Test-only fault injection: the fnclass CLI, SIGKILLed at a chosen moment of a run.

    FNCLASS_KILL_AT=POINT[:N][@RANK] python -m tests.faults train ...
    FNCLASS_KILL_AT=POINT[:N][@RANK] torchrun --nproc-per-node 2 -m tests.faults train ...

The process kills itself with SIGKILL on its N-th arrival (1st by default) at POINT; with ``@RANK``, only the
process of that rank in a torchrun job:

- ``step``: when the N-th train step has computed its new state, before anything of it is logged or saved;
- ``eval``: before the N-th evaluation batch (with one model and no TTA, an evaluation of at most
  ``train.eval_batch_size`` images is one batch);
- ``write:FILE``: halfway through the N-th write of FILE: its temporary file beside it (every file fnclass writes
  goes through ``fnclass.io.write_temp``), or half a line of ``metrics.jsonl``.

Nothing in fnclass knows about this module: :func:`install` wraps the functions at those moments (the program's
train and evaluation steps, the atomic writer, ``RunDirectory.log``) before the CLI starts, so the code a user
runs is the code the kill tests run, less these wrappers.
"""

from __future__ import annotations

import functools
import io
import json
import os
import signal
from pathlib import Path

ENV = "FNCLASS_KILL_AT"


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Arrivals:
    """Counts arrivals at one point and says when the N-th has come."""

    def __init__(self, spec: str):
        spec, _, rank = spec.partition("@")
        target, _, count = spec.rpartition(":")
        if not count.isdigit():
            target, count = spec, "1"
        self.target, self.count, self.arrived = target, int(count), 0
        self.here = not rank or rank == os.environ.get("RANK", "0")

    def due(self, point: str) -> bool:
        """Whether this arrival at ``point`` is the one to die at."""
        if not self.here or point != self.target:
            return False
        self.arrived += 1
        return self.arrived == self.count


def install(spec: str) -> None:
    """Wrap the moments of a run so that the process dies where ``spec`` (``POINT[:N][@RANK]``) says; "" does
    nothing."""
    if not spec:
        return
    import fnclass.io
    from fnclass.run.directory import RunDirectory
    from fnclass.training import program

    arrivals = Arrivals(spec)
    build_program = program.build_program

    @functools.wraps(build_program)
    def killing_program(setup):
        built = build_program(setup)
        train_step, eval_step = built.loop.train_step, built.eval_step

        def step(*args):
            out = train_step(*args)
            if arrivals.due("step"):
                _kill()
            return out

        def evaluate(params, state, images):
            if arrivals.due("eval"):
                _kill()
            return eval_step(params, state, images)

        built.loop.train_step = step
        return built._replace(eval_step=evaluate)

    program.build_program = killing_program

    write_temp = fnclass.io.write_temp

    @functools.wraps(write_temp)
    def killing_write_temp(path, payload):
        if not arrivals.due(f"write:{Path(path).name}"):
            return write_temp(path, payload)
        if callable(payload):
            buffer = io.BytesIO()
            payload(buffer)
            payload = buffer.getvalue()

        def half(handle):
            handle.write(payload[:len(payload) // 2])
            handle.flush()
            _kill()
        return write_temp(path, half)

    fnclass.io.write_temp = killing_write_temp  # write_atomic finds it in its module

    log = RunDirectory.log

    @functools.wraps(log)
    def killing_log(self, row):
        if self.writes and arrivals.due("write:metrics.jsonl"):
            line = json.dumps(row) + "\n"
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(line[:len(line) // 2])
                handle.flush()
            _kill()
        return log(self, row)

    RunDirectory.log = killing_log


def main() -> None:
    """``fnclass`` with the kill ``$FNCLASS_KILL_AT`` names installed."""
    install(os.environ.get(ENV, ""))
    from fnclass.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
