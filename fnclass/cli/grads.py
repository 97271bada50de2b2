"""``fnclass grads``: per-example gradient analysis of a checkpoint, or data-valuation scores (``--score``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from fnclass.cli import options
from fnclass.cli.errors import UsageProblem, one_line_errors, speaks
from fnclass.cli.progress import Progress

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


def _check_keep_fraction(fraction: float | None, score: str | None, split: str) -> None:
    """``--keep-fraction`` needs ``--score`` and the training split, and lies in (0, 1]."""
    if fraction is None:
        return
    if score is None:
        raise UsageProblem(f"--keep-fraction {fraction:g} needs --score el2n or --score grand: it keeps the "
                           "highest-scoring examples")
    if not 0 < fraction <= 1:  # written out: click's FloatRange lets nan through
        raise UsageProblem(f"--keep-fraction {fraction:g}: expected a fraction F with 0 < F <= 1, e.g. 0.7 (the "
                           "share of examples kept, highest scores first)")
    if split != "train":
        raise UsageProblem(f"--keep-fraction with --split {split}: kept_indices.txt is for data.train_indices, "
                           "which selects training images; use --split train")


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@options.data_dir
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--limit", type=click.IntRange(min=2), help="Analyse only the first N examples of the split.")
@click.option("--chunk-size", default="auto", show_default=True, help="Examples per vmap call: auto or K.")
@click.option("--max-memory", help="Budget for --chunk-size auto, e.g. 4GB (default: half the free GPU memory, "
              "or a quarter of the available RAM).")
@click.option("--top", type=click.IntRange(min=1),
              help="How many highest-norm examples to show in top_examples.png (default 64); with --score, how many "
                   "highest scores to list (default 10).")
@click.option("--score", type=click.Choice(["el2n", "grand"]),
              help="Instead, score every example for data valuation (Paul et al. 2021), averaged over a stacked "
                   "checkpoint's members: scores.csv, scores.json.")
@click.option("--keep-fraction", type=float, metavar="F",
              help="With --score: also write kept_indices.txt, the ceil(F x N) highest-scoring examples "
                   "(0 < F <= 1), for data.train_indices.")
@click.option("--rows", type=click.Choice(["run", "split"]), default="run", show_default=True,
              help="With --split train: run: the rows the checkpoint's run trained on (data.train_limit, "
                   "data.train_indices, less data.val_size), as `fnclass influence` takes; split: every row.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("grads"), show_default=True)
@options.weights
@options.precision
@options.device
@options.no_download
@options.as_json("the report")
@one_line_errors
def grads(checkpoint, data_dir, split, limit, chunk_size, max_memory, top, score, keep_fraction, rows, out, weights,
          precision, device, no_download, as_json):
    """Per-example gradients of a checkpoint or run folder: noise scale, layer shares, hardest examples; or scores.

    On the training split: the rows the run trained on (--rows split: every row), as `fnclass influence`.

    \b
    Examples:
      fnclass grads runs/cpu --limit 5000 --out grads/cpu
      fnclass grads runs/cpu/checkpoints/last.safetensors --score el2n --keep-fraction 0.7 --out scores/
      fnclass train --config cpu --set data.train_indices=scores/kept_indices.txt
    """
    from fnclass.analysis.gradients import analyze_checkpoint, score_checkpoint

    _check_keep_fraction(keep_fraction, score, split)
    checkpoint = options.run_checkpoint(checkpoint, quiet=as_json)
    console = Console(stderr=as_json)
    with Progress(Console(stderr=True), f"{score} scores" if score else "per-example gradients",
                  quiet=as_json) as progress:
        if score is not None:
            summary = score_checkpoint(checkpoint, out, method=score, data_dir=data_dir, split=split, limit=limit,
                                       chunk_size=_parse_chunk(chunk_size), max_memory=_parse_memory(max_memory),
                                       keep_fraction=keep_fraction, top=top or 10, device=device,
                                       download=not no_download, progress=progress, weights=weights,
                                       precision=precision, rows=rows)
        else:
            report = analyze_checkpoint(checkpoint, out, data_dir=data_dir, split=split, limit=limit,
                                        chunk_size=_parse_chunk(chunk_size), max_memory=_parse_memory(max_memory),
                                        top=top or 64, device=device, download=not no_download, progress=progress,
                                        weights=weights, precision=precision, rows=rows)
    if not speaks():  # a torchrun job: rank 0 reports
        return
    if score is not None:
        _show_scores(console, summary, out, as_json)
        return
    if as_json:
        click.echo(json.dumps(report, default=float))
        return
    noise = report["noise_scale"]
    console.print(f"{report['num_examples']} {split} examples{_rows(report)}, {report['weights']} weights in "
                  f"{report['precision']}, "
                  f"{report['examples_per_second']:.0f} examples/s (chunk {report['chunk_size']}); loss analysed: "
                  f"{report['loss']}", highlight=False)
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


def _show_scores(console: Console, summary: dict, out: Path, as_json: bool) -> None:
    """The summary of ``--score``: a line, the ranked table of the highest scores, what was written."""
    if as_json:
        click.echo(json.dumps(summary))
        return
    name = {"el2n": "EL2N", "grand": "GraNd"}[summary["method"]]
    members = f", the mean of {summary['members']} members" if summary["member_settings"] else ""
    console.print(f"{summary['num_examples']} {summary['split']} examples{_rows(summary)} scored by {name} "
                  f"({summary['weights']} "
                  f"weights) in {summary['precision']}{members}: mean "
                  f"{summary['mean_score']:.4g}; {summary['definition']}", highlight=False)
    table = Table(title=f"highest {name} scores")
    for column in ("rank", "index", "label", "class", "score"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in summary["top"]:
        table.add_row(str(row["rank"]), str(row["index"]), str(row["label"]), row["class"], f"{row['score']:.4g}")
    console.print(table)
    kept = (f", kept_indices.txt ({summary['kept']} of {summary['num_examples']} kept: the highest scores)"
            if summary["kept"] is not None else "")
    console.print(f"wrote scores.csv, scores.json{kept} to {out}", highlight=False)


def _rows(report: dict) -> str:
    """Which training rows were analysed, for the first line."""
    if report["split"] != "train":
        return ""
    return " (the rows the run trained on)" if report["rows"] == "run" else " (every row of the split)"
