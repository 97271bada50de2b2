"""``fnclass eval`` and ``fnclass calibrate``: accuracy and calibration of a trained model, clean and corrupted."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from fnclass.cli import options
from fnclass.cli.errors import UsageProblem, one_line_errors
from fnclass.cli.progress import Progress
from fnclass.cli.train import _model_file, _show


@click.command(name="eval")
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@click.option("--model", "model_name", metavar="NAME",
              help="A pretrained model of the zoo (see `fnclass models`) instead of CHECKPOINT.")
@click.option("--tta", is_flag=True, help="Also report test-time-augmented accuracy (flips, plus one-pixel "
              "translations when the checkpoint's config sets train.tta_translate).")
@options.data_dir
@click.option("--split", type=click.Choice(["test", "train", "val"]), default="test", show_default=True,
              help="val: the validation images the checkpoint's run held out (data.val_size).")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N images of the split.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the split's reliability diagram (PNG) here.")
@click.option("--corruptions", "corruptions_dir", type=click.Path(path_type=Path), metavar="DIR",
              help="Also evaluate on every corruption and severity of DIR (`fnclass data prepare cifar10-c`).")
@click.option("--corruptions-plot", type=click.Path(dir_okay=False, path_type=Path),
              help="With --corruptions: write accuracy and ECE per corruption and severity (PNG) here.")
@options.device
@options.precision
@options.no_download
@options.weights
@options.as_json("the result")
@one_line_errors
def evaluate(checkpoint, model_name, tta, data_dir, split, limit, plot, corruptions_dir, corruptions_plot, device,
             precision, no_download, weights, as_json):
    """Evaluate a checkpoint (or a run folder: its best checkpoint), a safetensors export or a pretrained model.

    Reports accuracy and calibration: NLL, ECE (15 confidence bins, L1) and Brier score, with the checkpoint's
    temperature when `fnclass calibrate` fitted one.

    \b
    Examples:
      fnclass eval runs/cpu --tta --data-dir ../shared/data/cifar10
      fnclass eval --model cifar10-cpu --plot reliability.png --data-dir ../shared/data/cifar10
      fnclass eval --model cifar10-cpu --corruptions data/cifar10-c --data-dir ../shared/data/cifar10
    """
    from fnclass.core.tree import tree_to
    from fnclass.core.tree import tree_unstack as unstack
    from fnclass.data import resolve_data_dir
    from fnclass.io import pick_device, resolve_precision
    from fnclass.run.export import load_for_evaluation
    from fnclass.training.evaluate import evaluate_members
    from fnclass.training.step import make_eval_step

    if corruptions_plot is not None and corruptions_dir is None:
        raise UsageProblem("--corruptions-plot needs --corruptions DIR")
    checkpoint = options.run_checkpoint(_model_file(checkpoint, model_name), quiet=as_json)
    ckpt = load_for_evaluation(checkpoint, weights=weights)
    corruption_set = _corruption_set(corruptions_dir, ckpt) if corruptions_dir is not None else None
    dev = pick_device(device)
    precision, _ = resolve_precision(precision, dev, name="--precision")
    folder = resolve_data_dir(data_dir, ckpt.config.data.dataset, download=not no_download)
    images, labels = _eval_split(ckpt, folder, split, limit)
    ckpt.check_split(folder, images, labels)
    params, state = tree_to((ckpt.params, ckpt.state), dev)
    models = list(zip(unstack(params), unstack(state))) if ckpt.members else [(params, state)]
    with Progress(Console(stderr=True), f"evaluating {split} images", quiet=as_json) as progress:
        results = evaluate_members(make_eval_step(ckpt.model, precision=precision), models, images.to(dev),
                                   labels.to(dev), mean=ckpt.mean, std=ckpt.std,
                                   batch_size=ckpt.config.train.eval_batch_size,
                                   tta=(1 + ckpt.config.train.tta_translate) if tta else 0,
                                   temperature=ckpt.temperature, progress=progress)
    result = results["ensemble"] or results["members"][0]  # a stacked checkpoint: its ensemble (mean logits)
    output = {**_eval_output(checkpoint, ckpt, split, labels, result, results, tta), "precision": precision}
    if plot is not None:
        from fnclass.training.calibration import plot_reliability

        plot_reliability(plot, {f"{split}, T = {ckpt.temperature:.3f}": result}, f"{checkpoint}: {split} split")
        output["plot"] = str(plot)
    if corruption_set is not None:
        output["corruptions"] = _evaluate_corruptions(ckpt, corruption_set, dev, corruptions_plot, result,
                                                      checkpoint, quiet=as_json)
    if as_json:
        click.echo(json.dumps(output))
        return
    _print_eval(output, ckpt, result, split, len(labels), tta)


def _eval_output(checkpoint, ckpt, split: str, labels, result: dict, results: dict, tta: bool) -> dict:
    """``fnclass eval --json``'s object (the members' own figures without the temperature, fitted to the ensemble)."""
    calibration = {k: result[k] for k in ("nll", "ece", "brier")}
    output = {"checkpoint": str(checkpoint), "weights": ckpt.weights, "split": split, "images": len(labels),
              "loss": result["loss"], "accuracy": result["accuracy"], **calibration,
              "temperature": ckpt.temperature, "reliability": result["reliability"],
              "per_class_accuracy": dict(zip(ckpt.classes, result["per_class_accuracy"]))}
    if "top5_accuracy" in result:
        output["top5_accuracy"] = result["top5_accuracy"]
    if tta:
        output["accuracy_tta"] = result["tta_accuracy"]
    if ckpt.members:
        output["members"] = [{"member": i, **member, "accuracy": r["accuracy"], "nll": r["nll"], "ece": r["ece"],
                              "brier": r["brier"], **({"accuracy_tta": r["tta_accuracy"]} if tta else {})}
                             for i, (member, r) in enumerate(zip(ckpt.members, results["members"]))]
    return output


def _print_eval(output: dict, ckpt, result: dict, split: str, count: int, tta: bool) -> None:
    """The human-readable report of ``fnclass eval``."""
    from fnclass.training.members import member_name

    temperature = f" (temperature {ckpt.temperature:.4f})" if ckpt.temperature != 1.0 else ""
    lines = [f"{split} images  {count}", f"weights      {ckpt.weights}", f"precision    {output['precision']}",
             f"loss         {result['loss']:.4f}",
             f"accuracy     {result['accuracy']:.2%}",
             f"NLL          {result['nll']:.4f}{temperature}", f"ECE          {result['ece']:.4f} (15 bins)",
             f"Brier        {result['brier']:.4f}"]
    if "top5_accuracy" in result:
        lines.append(f"top-5        {result['top5_accuracy']:.2%}")
    if tta:
        lines.append(f"TTA          {result['tta_accuracy']:.2%}")
    if ckpt.members:
        lines[3] += f" (ensemble of {len(ckpt.members)} members: the mean of their logits)"
        for entry, member in zip(output["members"], ckpt.members):
            lines.append(f"member {entry['member']:<5} {entry['accuracy']:.2%}, NLL {entry['nll']:.4f}, ECE "
                         f"{entry['ece']:.4f}  ({member_name(member)})")
    if "plot" in output:
        lines.append(f"reliability  {output['plot']}")
    console = Console()
    _show(console, str(output["checkpoint"]), lines, output["per_class_accuracy"])
    if "corruptions" in output:
        _print_corruptions(console, output["corruptions"])


def _corruption_set(folder: Path, ckpt):
    """The corruption folder, opened and checked against the model (classes, image size)."""
    from fnclass.data import DataError
    from fnclass.data.corruptions import read_corruption_set

    corruption_set = read_corruption_set(folder)
    if tuple(corruption_set.manifest["image_shape"][:2]) != tuple(ckpt.input_size):
        raise DataError(f"{folder}: images are {corruption_set.manifest['image_shape'][0]}x"
                        f"{corruption_set.manifest['image_shape'][1]}, the model takes {ckpt.input_size[0]}x"
                        f"{ckpt.input_size[1]}: build the corruptions from the data set it was trained on")
    if corruption_set.classes != tuple(ckpt.classes):
        raise DataError(f"{folder}: its classes.txt differs from the model's classes: build the corruptions from "
                        "the data set it was trained on")
    return corruption_set


def _evaluate_corruptions(ckpt, corruption_set, dev, plot_path, clean: dict, checkpoint, *, quiet: bool) -> dict:
    """Every corruption and severity (a rich progress bar unless ``quiet``), and the PNG when asked."""
    import torch

    from fnclass.analysis.robustness import evaluate_corruptions, plot_corruptions
    from fnclass.core.tree import tree_to
    from fnclass.run.checkpoint import ensemble_logits

    params, state = tree_to((ckpt.params, ckpt.state), dev)

    def logits_of(images):
        return ensemble_logits(ckpt.model, params, state, ckpt.mean, ckpt.std, torch.float32, images.to(dev),
                               len(ckpt.members))

    with Progress(Console(stderr=True), "corruptions", quiet=quiet) as progress:
        result = evaluate_corruptions(logits_of, corruption_set, temperature=ckpt.temperature,
                                      batch_size=ckpt.config.train.eval_batch_size, progress=progress)
    result["folder"] = str(corruption_set.folder)
    if plot_path is not None:
        plot_corruptions(plot_path, result, f"{checkpoint} on {corruption_set.folder}", clean)
        result["plot"] = str(plot_path)
    return result


def _print_corruptions(console: Console, result: dict) -> None:
    """A table per corruption (means over severities), per severity, and the mean of all."""
    table = Table(title=f"{result['folder']}: {result['images']} images per corruption and severity")
    table.add_column("corruption")
    for metric in ("accuracy", "NLL", "ECE", "Brier"):
        table.add_column(metric, justify="right")
    cells = lambda m: (f"{m['accuracy']:.2%}", f"{m['nll']:.4f}", f"{m['ece']:.4f}", f"{m['brier']:.4f}")
    for name, means in result["by_corruption"].items():
        table.add_row(name, *cells(means))
    table.add_section()
    for severity, means in result["by_severity"].items():
        table.add_row(f"severity {severity}", *cells(means))
    table.add_section()
    table.add_row("mean", *cells(result["mean"]), style="bold")
    console.print(table)
    if "plot" in result:
        console.print(f"plot: {result['plot']}", highlight=False)


def _eval_split(ckpt, folder: Path, split: str, limit: int | None):
    """``(images, labels)`` of a split; ``val`` is rebuilt from the run's data.val_size and data.val_seed (and the
    training images it chose: data.train_limit or data.train_indices)."""
    from fnclass.data import load_split, validation_split

    if split != "val":
        return load_split(folder, split, limit=limit)
    data = ckpt.config.data
    if not data.val_size:
        raise UsageProblem("--split val: this checkpoint's run held out no validation split (data.val_size = 0); "
                           "use --split test")
    images, labels = load_split(folder, "train", limit=data.train_limit, indices=data.train_indices)
    val = validation_split(labels, data.val_size, data.val_seed)[1][:limit]
    return images[val], labels[val]


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@options.data_dir
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the calibrated checkpoint here instead of over CHECKPOINT.")
@options.device
@options.no_download
@options.weights
@options.as_json("the fit")
@one_line_errors
def calibrate(checkpoint, data_dir, out, device, no_download, weights, as_json):
    """Fit a temperature on the validation split a checkpoint's run held out, and record it in the checkpoint.

    The temperature T minimises the NLL of softmax(logits / T) on the validation images (data.val_size) only;
    the test split is reported before and after, never fitted on. The checkpoint is rewritten atomically (or
    written to --out); `fnclass predict`, `eval` and every export then use it.

    \b
    Example:
      fnclass calibrate runs/cpu-val/checkpoints/last.safetensors --data-dir ../shared/data/cifar10
    """
    from fnclass.data import resolve_data_dir
    from fnclass.io import pick_device
    from fnclass.run.checkpoint import load_checkpoint
    from fnclass.training.calibration import fit_checkpoint

    ckpt = load_checkpoint(checkpoint, weights=weights)
    if not ckpt.config.data.val_size:
        raise UsageProblem(f"{checkpoint}: its run held out no validation split (data.val_size = 0), so there is "
                           "nothing to fit a temperature on; retrain with --set data.val_size=5000 (fitting on the "
                           "test split would be dishonest)")
    folder = resolve_data_dir(data_dir, ckpt.config.data.dataset, download=not no_download)
    splits = {name: _eval_split(ckpt, folder, name, None) for name in ("val", "test")}
    for images, labels in splits.values():
        ckpt.check_split(folder, images, labels)
    with Progress(Console(stderr=True), "evaluating val and test images", quiet=as_json) as progress:
        report = fit_checkpoint(ckpt, checkpoint, splits, device=pick_device(device), out=out, progress=progress)
    if as_json:
        click.echo(json.dumps(report))
        return
    lines = [f"temperature  {report['temperature']:.4f} (fitted on {report['fitted_on']}, {ckpt.weights} weights)"]
    for name in ("val", "test"):
        before, after = report[name]["before"], report[name]["after"]
        lines.append(f"{name:<5} NLL {before['nll']:.4f} -> {after['nll']:.4f}, ECE {before['ece']:.4f} -> "
                     f"{after['ece']:.4f}, Brier {before['brier']:.4f} -> {after['brier']:.4f}")
    lines.append(f"written to   {report['path']}")
    _show(Console(), str(checkpoint), lines, None)


__all__ = ["evaluate", "calibrate"]
