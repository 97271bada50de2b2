"""Options several commands share, defined once (click decorators)."""

from __future__ import annotations

from pathlib import Path

import click

device = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                      help="auto: CUDA when available, else the CPU.")
data_dir = click.option("--data-dir", type=click.Path(path_type=Path),
                        help="Data folder (else $FNCLASS_DATA, then the cache).")
weights = click.option("--weights", type=click.Choice(["auto", "ema", "raw"]), default="auto", show_default=True,
                       help="ema: the moving average a run with train.ema_decay keeps; raw: the trained weights; "
                            "auto: the EMA when the checkpoint has one.")
precision = click.option(
    "--precision", type=click.Choice(["fp32", "bf16", "auto"]), default="fp32", show_default=True,
    help="Compute the model in this precision: bf16 autocast (on CUDA and the CPU; parameters, gradients and "
         "results stay float32) is faster where the device has bf16 units and rounds to ~3 significant digits; "
         "auto: bf16 where it has them.")
no_download = click.option("--no-download", is_flag=True, help="Never download a data set through torchvision.")


def as_json(what: str):
    """``--json``: print ``what`` as one JSON object."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as one JSON object.")


def shipped_names() -> str:
    """``cpu, dp, fast, fast95, seed``: the shipped configs' names, read from the package's configs folder."""
    from fnclass.config import shipped_configs

    return ", ".join(shipped_configs())


def complete_config(ctx, param, incomplete: str):
    """Shell completion of ``--config``: the shipped names, then TOML files (the shell's own file completion)."""
    from click.shell_completion import CompletionItem

    from fnclass.config import shipped_configs

    names = [CompletionItem(name) for name in shipped_configs() if name.startswith(incomplete)]
    return names + [CompletionItem(incomplete, type="file")]


def config_options(command):
    """``--config`` and ``--set``: a shipped config by name or a TOML file, and overrides."""
    command = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a config key, e.g. optim.lr=3e-4 (repeatable; the value is TOML).")(command)
    return click.option("--config", "config_path", metavar="NAME|FILE", shell_complete=complete_config,
                        help=f"A shipped config by name ({shipped_names()}) or a TOML file (default: fast on a GPU, "
                             "cpu on the CPU).")(command)


def run_checkpoint(path: Path, *, quiet: bool = False) -> Path:
    """A model file as given, or for a run folder (as ``fnclass influence`` takes) its best checkpoint, else its
    last, said on standard error unless ``quiet``."""
    from fnclass.cli.errors import UsageProblem, speaks

    if not Path(path).is_dir():
        return path
    folder = Path(path) / "checkpoints"
    for name, meaning in (("best", "the run's best checkpoint"), ("last", "the run's last checkpoint")):
        chosen = folder / f"{name}.safetensors"
        if chosen.is_file():
            if not quiet and speaks():
                click.echo(f"{path}: using {chosen} ({meaning}; give a file to choose another)", err=True)
            return chosen
    raise UsageProblem(f"{path} is a folder without checkpoints/best.safetensors or last.safetensors; give a "
                       "checkpoint or model file, or the folder of a run that has saved one")
