"""Run under torchrun by tests/test_distributed.py: the fnclass command line as ``python -m fnclass`` runs it, with
an interpreter-exit handler that says whether the process went through the interpreter's finalization (a process
that joined a job must leave through ``os._exit``, which skips it)."""

import atexit
import sys

atexit.register(lambda: print("interpreter finalization ran", file=sys.stderr, flush=True))

from fnclass.cli import main  # noqa: E402  (the handler first: it must be the last to run, as fnclass's own are)

if __name__ == "__main__":
    main(sys.argv[1:], prog_name="fnclass")
