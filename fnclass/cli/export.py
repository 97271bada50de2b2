"""``fnclass export`` and ``fnclass predict``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from fnclass.cli import options
from fnclass.cli.errors import UsageProblem, one_line_errors

# fnclass.run.export's FORMATS and DTYPES, named here so that --help does not import torch (a test checks they agree).
FORMATS = ("safetensors", "pt2", "onnx")
DTYPES = ("float32", "bfloat16", "float16")

SUFFIXES = {"safetensors": ".inference.safetensors", "pt2": ".pt2", "onnx": ".onnx"}


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--format", "format_", type=click.Choice(FORMATS), default="safetensors", show_default=True,
              help="safetensors: inference weights + metadata; pt2: a torch.export program; onnx: an ONNX model.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
              help="Dtype of the weights and of the program's arithmetic (logits are always float32).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="File to write [default: beside CHECKPOINT, named <stem>.inference.safetensors, .pt2 or .onnx].")
@click.option("--member", type=click.IntRange(min=0), default=None,
              help="From a run of members: export this member as one model.")
@click.option("--ensemble", is_flag=True, help="From a run of members: one model whose logits are their mean.")
@options.weights
@options.as_json("the summary")
@one_line_errors
def export(checkpoint, format_, dtype, out, member, ensemble, weights, as_json):
    """Export a checkpoint (or a run folder: its best checkpoint) for inference: data or a self-contained program.

    \b
    Examples:
      fnclass export runs/cpu/checkpoints/best.safetensors --format pt2 --out model.pt2
      fnclass export runs/cpu/checkpoints/best.safetensors --format onnx --dtype float16 --out model.onnx
      fnclass export runs/seeds/checkpoints/last.safetensors --ensemble --format pt2 --out ensemble.pt2
    """
    from fnclass.run.export import export_checkpoint

    checkpoint = options.run_checkpoint(checkpoint, quiet=as_json)

    out = out if out is not None else checkpoint.with_name(checkpoint.stem + SUFFIXES[format_])
    if out.is_dir():
        raise UsageProblem(f"--out {out}: is a folder; give a file name such as {out / ('model' + SUFFIXES[format_])}")
    if checkpoint.exists() and out.exists() and out.resolve() == checkpoint.resolve():
        raise UsageProblem(f"--out {out}: would overwrite the checkpoint being exported; choose another file")
    try:  # before the export, which can take a while: a file in the way of the folder fails here
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageProblem(f"--out {out}: cannot create its folder ({error.strerror}); choose another path") from None
    summary = export_checkpoint(checkpoint, out, format=format_, dtype=dtype, member=member, ensemble=ensemble,
                                weights=weights)
    if as_json:
        click.echo(json.dumps(summary))
        return
    metadata = summary["metadata"]
    table = Table(title=f"exported {checkpoint}", show_header=False)
    for name, value in [("file", summary["path"]), ("format", format_), ("dtype", dtype),
                        ("bytes", f"{summary['bytes']:,}"), ("model", metadata["model"]),
                        ("weights", metadata.get("weights", "raw")),
                        ("classes", ", ".join(json.loads(metadata["classes"]))),
                        ("input", f"uint8 (N, {', '.join(map(str, json.loads(metadata['input_size'])))}, 3)"),
                        ("members", str(len(json.loads(metadata["members"]))) + " (logits: their mean)"
                         if "members" in metadata else f"member {member}" if member is not None else "-"),
                        ("source sha256", metadata["source_sha256"]), ("source step", metadata["source_step"]),
                        ("check", f"max |logit diff| vs checkpoint {summary['max_abs_logit_diff']:.2e} "
                                  "on 16 random images")]:
        table.add_row(name, value)
    Console().print(table)


@click.command(name="predict")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "model_name", metavar="NAME",
              help="A pretrained model of the zoo (see `fnclass models`); then every argument is an image.")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="Classes shown per image.")
@click.option("--trust-program", is_flag=True,
              help="Allow a pt2 MODEL: loading a torch.export program runs code stored in it.")
@options.weights
@options.as_json("the predictions")
@one_line_errors
def predict_command(model, images, model_name, top, trust_program, weights, as_json):
    """Classify PNG/JPEG images with a checkpoint or run folder, any exported model file or a pretrained model.

    Images of any size are resized to the model's input size.

    \b
    Examples:
      fnclass predict model.onnx cat.png ship.jpg --top 3
      fnclass predict model.pt2 cat.png --trust-program
      fnclass predict --model cifar10-cpu cat.png ship.jpg
    """
    from fnclass.run.export import predict

    predictor = None
    if model_name is not None:  # MODEL, if given, is the first image
        images = (model, *images) if model is not None else images
        from fnclass.run.zoo import predictor as zoo_predictor

        if not images:
            raise UsageProblem("no images to classify: give one or more PNG/JPEG files after --model NAME")
        predictor, model = zoo_predictor(model_name), model_name
    elif model is None or not images:
        raise UsageProblem("give a MODEL file and one or more images, or --model NAME and images "
                           "(see `fnclass models`)")
    model = options.run_checkpoint(model, quiet=as_json) if model_name is None else model
    result = predict(model, images, top=top, trust_program=trust_program, predictor=predictor, weights=weights)
    if as_json:
        click.echo(json.dumps(result))
        return
    table = Table(title=f"{model} ({result['format']}, {result['weights']} weights)")
    for column in ("image", "rank", "class", "probability"):
        table.add_column(column, justify="right" if column in ("rank", "probability") else "left")
    for prediction in result["predictions"]:
        for rank, guess in enumerate(prediction["top"], 1):
            table.add_row(prediction["image"] if rank == 1 else "", str(rank), guess["class"],
                          f"{guess['probability']:.2%}", end_section=rank == len(prediction["top"]))
    Console().print(table)


@click.command()
@options.as_json("the model cards")
@one_line_errors
def models(as_json):
    """List the pretrained models shipped with fnclass (the model zoo).

    \b
    Examples:
      fnclass models
      fnclass predict --model cifar10-cpu cat.png
      fnclass eval --model cifar10-cpu --tta --data-dir ../shared/data/cifar10
    """
    from fnclass.run.zoo import cards

    entries = cards()
    if as_json:
        click.echo(json.dumps(list(entries.values())))
        return
    table = Table(title="fnclass model zoo (weights ship with the package)")
    numbers = ("params", "test acc", "TTA acc", "NLL", "ECE")
    for column in ("name", "model", *numbers[:1], "weights", *numbers[1:]):
        table.add_column(column, no_wrap=True, justify="right" if column in numbers else "left")
    notes = []
    for name, entry in entries.items():
        accuracy, trained, calibration = entry["accuracy"], entry["trained"], entry.get("calibration", {}).get("test")
        table.add_row(name, entry["model"], f"{entry.get('parameters', 0):,}",
                      f"{entry['dtype']} {entry.get('weights_bytes', 0) / 1e6:.1f} MB", f"{accuracy['test']:.2%}",
                      f"{accuracy['test_tta']:.2%}" if "test_tta" in accuracy else "-",
                      *((f"{calibration['nll']:.3f}", f"{calibration['ece']:.3f}") if calibration else ("-", "-")))
        notes.append(f"{name}: {entry['summary']}; config {entry['config']}, seed {entry['seed']}, trained "
                     f"{trained.get('date', '?')} in {trained.get('wall', '?')} on {trained.get('machine', '?')}")
    console = Console()
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)


__all__ = ["export", "models", "predict_command"]
