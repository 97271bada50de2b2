"""``fnclass grads``: per-example gradient analysis of a checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fnclass.cli import options
from fnclass.cli.errors import UsageProblem, one_line_errors, speaks

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def _parse_memory(text: str | None) -> int | None:
    """``"2GB"``, ``"512MiB"`` or a byte count -> bytes."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise UsageProblem(f"--max-memory {text!r}: expected a size such as 2GB, 512MiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _parse_chunk(text: str) -> int | str:
    """``auto`` or a positive integer."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise UsageProblem(f"--chunk-size {text!r}: expected auto or a positive integer")
    return int(text)


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@options.data_dir
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--limit", type=click.IntRange(min=2), help="Analyse only the first N examples of the split.")
@click.option("--chunk-size", default="auto", show_default=True, help="Examples per vmap call: auto or K.")
@click.option("--max-memory", help="Budget for --chunk-size auto, e.g. 4GB (default: half the free GPU memory, "
              "or a quarter of the available RAM).")
@click.option("--top", type=click.IntRange(min=1), default=64, show_default=True,
              help="How many highest-norm examples to show in top_examples.png.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("grads"), show_default=True)
@options.device
@options.no_download
@options.as_json("the report")
@one_line_errors
def grads(checkpoint, data_dir, split, limit, chunk_size, max_memory, top, out, device, no_download, as_json):
    """Per-example gradients of a checkpoint: noise scale, layer shares, hardest examples.

    \b
    Example:
      fnclass grads runs/cpu/checkpoints/best.safetensors --limit 5000 --out grads/cpu
    """
    from fnclass.analysis import analyze_checkpoint

    console = Console(stderr=as_json)
    with Progress(TextColumn("per-example gradients"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal or as_json or not speaks()) as bar:
        task = bar.add_task("grads", total=None)

        def progress(done):
            bar.update(task, completed=done)

        report = analyze_checkpoint(checkpoint, out, data_dir=data_dir, split=split, limit=limit,
                                    chunk_size=_parse_chunk(chunk_size), max_memory=_parse_memory(max_memory),
                                    top=top, device=device, download=not no_download, progress=progress)
    if not speaks():  # a torchrun job: rank 0 reports
        return
    if as_json:
        click.echo(json.dumps(report, default=float))
        return
    noise = report["noise_scale"]
    console.print(f"{report['num_examples']} {split} examples, {report['examples_per_second']:.0f} examples/s "
                  f"(chunk {report['chunk_size']}); loss analysed: {report['loss']}", highlight=False)
    console.print(f"gradient noise scale B_simple = {noise['b_simple']:.4g}  (tr Sigma {noise['trace_sigma']:.4g}, "
                  f"|G|^2 {noise['mean_grad_sq_norm']:.4g}); mean loss {report['mean_loss']:.4f}, "
                  f"accuracy {report['accuracy']:.2%}", highlight=False)
    groups = Table(title="layer groups")
    for column in ("group", "share of |g|^2", "B_simple"):
        groups.add_column(column, justify="left" if column == "group" else "right")
    for group, share in report["group_norm_share"].items():
        groups.add_row(group, f"{share:.1%}", f"{report['group_noise_scale'][group]['b_simple']:.4g}")
    console.print(groups)
    classes = Table(title="per class")
    for column in ("class", "examples", "mean |g|", "mean loss", "accuracy"):
        classes.add_column(column, justify="left" if column == "class" else "right")
    for name, row in report["per_class"].items():
        classes.add_row(name, str(row["count"]), f"{row['mean_grad_norm']:.4g}", f"{row['mean_loss']:.4f}",
                        f"{row['accuracy']:.2%}")
    console.print(classes)
    console.print(f"wrote per_example.csv, report.json, top_examples.png, norms.png to {out}", highlight=False)
