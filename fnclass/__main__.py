"""``python -m fnclass``: the CLI, as torchrun starts it (``torchrun --nproc-per-node N -m fnclass train ...``)."""

from fnclass.cli import main

main()
