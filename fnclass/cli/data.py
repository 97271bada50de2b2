"""``fnclass data``: write and inspect data folders in the canonical ``.npy`` format."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fnclass.cli import options
from fnclass.cli.errors import UsageProblem, one_line_errors

DEFAULT_TEST_FRACTION = 0.2  # fnclass.data.DEFAULT_TEST_FRACTION (a test checks they agree); kept here for --help


@click.group()
def data() -> None:
    """Write and inspect data folders (.npy arrays plus classes.txt).

    \b
    Examples:
      fnclass data prepare cifar10 --out ~/.cache/fnclass/cifar10
      fnclass data info ../shared/data/cifar10
    """


@data.command("prepare")
@click.argument("source")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the five files into (created if needed).")
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="Side of the square images in pixels, for image folders, stl10, fashion-mnist and mnist.  "
                   "[default: 32; 28 for (fashion-)mnist]")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Share of each class held out for test, for image folders without train/ and test/ "
                   f"(every 5th sorted file at 0.2).  [default: {DEFAULT_TEST_FRACTION}]")
@click.option("--from", "from_dir", type=click.Path(file_okay=False, path_type=Path),
              help="cifar10-c: the data folder whose test split is corrupted.")
@click.option("--images", type=click.IntRange(min=1), help="cifar10-c: corrupt only the first N test images.")
@click.option("--corruption", "corruption_names", multiple=True, metavar="NAME",
              help="cifar10-c: only this corruption (repeatable; default: all 15).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="cifar10-c: the seed every image's corruption derives from.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="cifar10-c: processes corrupting in parallel (the files do not depend on it).")
@options.no_download
@one_line_errors
def prepare_command(source: str, out_dir: Path, size: int | None, test_fraction: float | None, from_dir: Path | None,
                    images: int | None, corruption_names: tuple[str, ...], seed: int, workers: int,
                    no_download: bool) -> None:
    """Write a data folder from a torchvision dataset or an image folder.

    SOURCE is cifar10, cifar100, svhn, stl10, fashion-mnist or mnist (through torchvision, downloaded
    into OUT/torchvision unless already there; svhn needs scipy) or a folder with one sub-folder of
    PNG/JPEG images per class, optionally inside train/ and test/ folders. Images are converted to RGB
    (grey ones repeat their channel) and resized to SIZE x SIZE: Lanczos for image folders, bicubic for
    stl10 (96x96, made 32x32) and (fashion-)mnist (kept at 28x28 without --size). cifar and svhn are
    32x32 only. A folder named like a dataset is reached as ./NAME.

    \b
    Examples:
      fnclass data prepare cifar10 --out ~/.cache/fnclass/cifar10
      fnclass data prepare svhn --out ~/.cache/fnclass/svhn
      fnclass data prepare mnist --out ~/.cache/fnclass/mnist --size 32
      fnclass data prepare ./flowers --out data/flowers --size 32 --test-fraction 0.2
      fnclass data prepare cifar10-c --from ../shared/data/cifar10 --out data/cifar10-c

    cifar10-c writes CIFAR-10-C's 15 corruptions at severities 1-5 of the --from folder's test split (the
    corruptions extra: pip install 'fnclass[corruptions]'), for `fnclass eval --corruptions`.
    """
    if source == "cifar10-c":
        _prepare_corruptions(from_dir, out_dir, images, corruption_names, seed, workers)
        return
    if from_dir is not None or images is not None or corruption_names:
        raise UsageProblem("--from, --images and --corruption are for `fnclass data prepare cifar10-c`")
    from fnclass.data import prepare

    folder = prepare(source, out_dir, size=size, test_fraction=test_fraction, download=not no_download)
    click.echo(f"wrote {folder} (see `fnclass data info {folder}`)")


def _prepare_corruptions(from_dir: Path | None, out_dir: Path, images: int | None, names: tuple[str, ...], seed: int,
                         workers: int) -> None:
    """``fnclass data prepare cifar10-c``: a corruption folder from a data folder's test split, with progress."""
    from rich.progress import Progress

    from fnclass.data.corruptions import CORRUPTIONS, prepare_corruptions

    if from_dir is None:
        raise UsageProblem("cifar10-c corrupts a data folder's test split: give it with --from DATA_DIR")
    with Progress(transient=True) as bar:
        task = bar.add_task("corrupting", total=len(names or CORRUPTIONS) * 5)
        folder = prepare_corruptions(from_dir, out_dir, images=images, seed=seed, corruptions=names or CORRUPTIONS,
                                     workers=workers, progress=lambda done, total: bar.update(task, completed=done))
    click.echo(f"wrote {folder} (evaluate with `fnclass eval CHECKPOINT --corruptions {folder}`)")


@data.command("info")
@click.argument("folder", type=click.Path(path_type=Path))
@options.as_json("the facts")
@one_line_errors
def info_command(folder: Path, as_json: bool) -> None:
    """Show class counts, mean/std, image shape and checksums.

    \b
    Examples:
      fnclass data info ../shared/data/cifar10
      fnclass data info ../shared/data/cifar10 --json
    """
    from fnclass.data import dataset_info

    summary = dataset_info(folder)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _render_info(summary, Console(highlight=False))


def _render_info(summary: dict, console: Console) -> None:
    """Counts per class as a table, then shape, statistics and ``sha256sum``-style checksum lines."""
    table = Table(title=escape(summary["folder"]), show_footer=True)
    table.add_column("label", "total", justify="right")
    table.add_column("class")
    table.add_column("train", str(summary["train_size"]), justify="right")
    table.add_column("test", str(summary["test_size"]), justify="right")
    for label, (name, train, test) in enumerate(zip(summary["classes"], summary["counts"]["train"],
                                                    summary["counts"]["test"])):
        table.add_row(str(label), escape(name), str(train), str(test))
    console.print(table)
    console.print(f"image shape  {' x '.join(map(str, summary['image_shape']))}")
    console.print(f"train mean   {' '.join(f'{value:.4f}' for value in summary['mean'])}  (RGB, in [0, 1])")
    console.print(f"train std    {' '.join(f'{value:.4f}' for value in summary['std'])}")
    console.print("sha256", style="bold")
    for name, digest in summary["sha256"].items():
        console.print(f"{digest}  {escape(name)}", soft_wrap=True)
    console.print(f"{summary['sha256_all']}  (all five: SHA-256 of the five lines above)", soft_wrap=True)
