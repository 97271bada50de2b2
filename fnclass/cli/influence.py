"""``fnclass influence``: which training examples made a prediction (TracIn, TRAK, EK-FAC, metagradients), and
self-influence."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from fnclass.cli import options
from fnclass.cli.errors import UsageProblem, one_line_errors, speaks
from fnclass.cli.grads import _parse_chunk, _parse_memory
from fnclass.cli.progress import Progress


@click.command()
@click.argument("sources", nargs=-1, required=True, metavar="RUN_DIR_OR_CHECKPOINTS...",
                type=click.Path(path_type=Path))
@options.data_dir
@click.option("--test-indices", help="Test-split examples to attribute, e.g. 0,5,10-19 (default: 0-7).")
@click.option("--images", "image_paths", multiple=True, type=click.Path(path_type=Path),
              help="PNG/JPEG files to attribute instead (for the class the model predicts); repeatable.")
@click.option("--self", "self_mode", is_flag=True,
              help="Rank every training example by self-influence instead (with --method tracin or ekfac). To "
                   "find mislabelled examples, rank by EL2N first: fnclass grads --score el2n (docs/attribution.md).")
@click.option("--method", type=click.Choice(["tracin", "trak", "ekfac", "metagrad"]), default="tracin",
              show_default=True,
              help="tracin: lr-weighted gradient dot products over the checkpoints; trak: TRAK over every "
                   "model (members and checkpoints), projected; ekfac: influence functions with EK-FAC curvature "
                   "at the final checkpoint; metagrad: the exact derivative of the margin through the whole "
                   "replayed run (one run directory).")
@click.option("--proj-dim", type=click.IntRange(min=1),
              help="Project gradients to P dimensions (tracin default: exact; trak default: 2048).")
@click.option("--damping", type=float, help="trak: added to Phi^T Phi before the solve, as a multiple of its mean "
              "diagonal (default 0.1; 0 is TRAK as published); ekfac: added to each layer's corrected eigenvalues, "
              "as a multiple of their mean (default 0.1, Kronfluence's heuristic).")
@click.option("--top", type=click.IntRange(min=1), help="Proponents and opponents per test example (default 8); "
              "with --self, examples in the grid (default 32).")
@click.option("--train-limit", type=click.IntRange(min=1), help="Attribute to the first N training examples only.")
@click.option("--factor-examples", type=click.IntRange(min=1),
              help="ekfac: fit the curvature on N training examples drawn at random (default: all of them); the "
                   "scores still cover every training example.")
@click.option("--chunk-size", default="auto", show_default=True, help="Examples per vmap call: auto or K.")
@click.option("--max-memory", help="Budget for --chunk-size auto, e.g. 4GB.")
@options.weights
@options.precision
@click.option("--uniform", is_flag=True, help="Weigh every checkpoint 1 (for files without a recorded learning rate).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Key of the random projections (tracin, trak) and of EK-FAC's labels drawn from the model.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("influence"),
              show_default=True)
@options.device
@options.no_download
@options.as_json("the report")
@one_line_errors
def influence(sources, data_dir, test_indices, image_paths, self_mode, method, proj_dim, damping, top, train_limit,
              factor_examples, chunk_size, max_memory, weights, precision, uniform, seed, out, device, no_download,
              as_json):
    """Which training examples made these predictions: TracIn over the checkpoints of a run, or TRAK.

    A run directory stands for the checkpoints it kept along the run (train it with
    --set checkpoint.every_epochs=1); checkpoint files can be given instead.

    \b
    Examples:
      fnclass influence runs/cpu --test-indices 0-7 --out influence/cpu
      fnclass influence runs/cpu --method ekfac --test-indices 0-7 --out influence/ekfac
      fnclass influence runs/seeds --method trak --proj-dim 2048 --test-indices 0-99
      fnclass influence runs/cpu --self --method ekfac --out influence/self
    """
    from fnclass.analysis import influence as attribution

    if self_mode and (test_indices or image_paths or method not in ("tracin", "ekfac") or proj_dim):
        raise UsageProblem("--self ranks training examples by exact TracIn or EK-FAC self-influence: drop "
                           "--test-indices, --images and --proj-dim; --method tracin or ekfac")
    if test_indices and image_paths:
        raise UsageProblem("--test-indices and --images both choose what to attribute: use one")
    if method == "metagrad" and (self_mode or image_paths or proj_dim or damping is not None or train_limit
                                 or uniform or factor_examples or len(sources) != 1):
        raise UsageProblem("--method metagrad replays one run directory for test-split examples: give one RUN_DIR "
                           "and --test-indices; drop --self, --images, --proj-dim, --damping, --train-limit, "
                           "--factor-examples and --uniform")
    if method == "metagrad" and precision == "bf16":
        raise UsageProblem("--method metagrad replays the run in float32 (or float64): drop --precision bf16")
    if method == "metagrad" and weights == "ema":
        raise UsageProblem("--method metagrad replays the run's training, which ends on the raw weights: drop "
                           "--weights ema (auto takes the raw weights here)")
    console = Console(stderr=as_json)
    what = {"metagrad": "replayed steps", "ekfac": "EK-FAC passes"}.get(method, "per-example gradients")
    with Progress(Console(stderr=True), f"{method}: {what}", quiet=as_json) as progress:
        common = dict(data_dir=data_dir, train_limit=train_limit, chunk_size=_parse_chunk(chunk_size),
                      max_memory=_parse_memory(max_memory), uniform=uniform, device=device, weights=weights,
                      precision=precision, download=not no_download, progress=progress)
        if method == "metagrad":
            from fnclass.training import metagrad

            report = metagrad.attribute(sources[0], out, test_indices=test_indices, top=top or 8, data_dir=data_dir,
                                        device=device, download=not no_download, progress=progress,
                                        max_memory=_parse_memory(max_memory))
        elif self_mode:
            report = attribution.rank_self_influence(sources, out, top=top or 32, method=method, damping=damping,
                                                     seed=seed, factor_examples=factor_examples, **common)
        else:
            report = attribution.attribute(sources, out, test_indices=test_indices, image_paths=image_paths,
                                           top=top or 8, method=method, proj_dim=proj_dim, damping=damping, seed=seed,
                                           factor_examples=factor_examples, **common)
    if not speaks():  # a torchrun job: rank 0 reports
        return
    if as_json:
        click.echo(json.dumps(report))
        return
    _print_report(console, report, method, self_mode, out)


def _print_report(console: Console, report: dict, method: str, self_mode: bool, out: Path) -> None:
    """The summary line, the table and the files written."""
    classes = report["classes"]
    speed = report["gradients_per_second"]
    if method == "metagrad":
        ratio = f" ({report['seconds'] / report['train_seconds']:.1f}x the run's training)" \
            if report["train_seconds"] else ""
        console.print(f"metagrad (raw weights): through {report['steps']} replayed steps (the replay ends on the "
                      f"run's last checkpoint to {report['replay_error']:.1g}), {report['train_examples']} training "
                      f"examples, {report['seconds']:.1f} s{ratio}", highlight=False)
    else:
        console.print(f"{report['method']} ({report['weights']} weights): {_models(report)}, "
                      f"{report['train_examples']:,} training examples, {speed:,.0f} per-example gradients/s in "
                      f"{report['precision']} (chunk {report['chunk_size']})", highlight=False)
    if "ekfac_layers" in report:
        console.print(f"EK-FAC over {len(report['ekfac_layers'])} convolution/linear layers (damping "
                      f"{report['damping']:g}); left out: {len(report['ekfac_left_out'])} normalisation and frozen-"
                      "stem parameters", highlight=False)
    if self_mode:
        table = Table(title="highest self-influence (mislabelled and atypical examples come first)")
        for column in ("rank", "index", "label", "predicted", "score"):
            table.add_column(column, justify="right" if column in ("rank", "index", "score") else "left")
        for rank, row in enumerate(report["top"][:16], 1):
            table.add_row(str(rank), str(row["index"]), classes[row["label"]], classes[row["predicted"]],
                          f"{row['score']:.4g}")
        console.print(table)
        console.print(f"wrote self_influence.csv, self_influence.json, self_influence.png to {out}", highlight=False)
        return
    table = Table(title="top proponents (+) and opponents (-): training index, label, score")
    for column in ("test", "label", "proponents", "opponents"):
        table.add_column(column)
    cell = lambda rows: "\n".join(f"#{r['index']} {classes[r['label']]} {r['score']:+.3g}" for r in rows[:3])
    for test in report["tests"]:
        table.add_row(str(test["test"]), classes[test["label"]], cell(test["proponents"]), cell(test["opponents"]))
    console.print(table)
    console.print(f"wrote influence.csv, influence.json, scores.npy, train_indices.npy, influence.png to {out}",
                  highlight=False)


def _models(report: dict) -> str:
    """``2 checkpoints of the run``, or with members ``6 models (3 members at each of 2 checkpoints)``."""
    count, models = len(report["checkpoints"]), report["models"]
    said = f"{count} checkpoint{'s' if count != 1 else ''}"
    if models == count:
        return said
    return f"{models} models ({models // count} members at each of {said})" if models % count == 0 else \
        f"{models} models over {said}"
