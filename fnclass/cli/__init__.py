"""The ``fnclass`` command line: a thin click shell over the library, rendered with rich.

Command modules import the library (and so torch) inside their functions: ``fnclass --help`` and shell
completion stay fast.
"""

from __future__ import annotations

import sys

import click

from fnclass.cli import config, data, evaluate, export, grads, influence, train
from fnclass.cli.errors import OneLineGroup


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fnclass")
def main() -> None:
    """fnclass: CIFAR-10 classification with pure functions over pytrees.

    \b
    Example:
      fnclass train --config cpu --data-dir ../shared/data/cifar10
    Shell completion (bash; zsh and fish alike):
      eval "$(_FNCLASS_COMPLETE=bash_source fnclass)"
    """


for _command in (train.train, evaluate.evaluate, evaluate.calibrate, train.info, config.config, data.data, grads.grads,
                 influence.influence, export.export, export.predict_command, export.models):
    main.add_command(_command)

if __name__ == "__main__":
    sys.exit(main())
