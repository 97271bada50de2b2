"""``fnclass train``, ``fnclass eval`` and ``fnclass info``."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fnclass.cli import options
from fnclass.cli.errors import Diverged, UsageProblem, one_line_errors
from fnclass.config import config_to_dict, load_config, toml_value

COLUMNS = [("epoch", 5, "{:d}"), ("train loss", 10, "{:.4f}"), ("train acc", 9, "{:.2%}"),
           ("test loss", 9, "{:.4f}"), ("test acc", 8, "{:.2%}"), ("lr", 9, "{:.2e}"), ("seconds", 7, "{:.1f}")]


def _row(values) -> str:
    """One fixed-width line of the epoch table."""
    return "  ".join(str(v).rjust(width) for v, (_, width, _) in zip(values, COLUMNS))


class RichReporter:
    """Progress bar while an epoch runs, a table row per epoch, a summary panel at the end (a run's Reporter)."""

    def __init__(self, console: Console, *, mode: str):
        self.console, self.mode = console, mode
        self.split = "test"  # the split evaluated each epoch: "val" when the run holds one out
        self.base_lr = None  # with an optim.lr sweep: the lr column is the schedule's multiplier of each member's lr
        self.progress = None
        self.task = None
        self.loss = "-"  # the last logged loss, formatted ("-" until the first logging step)

    def start(self, info):
        for name, reason in info.get("rejected_checkpoints") or []:  # said even when quiet: a checkpoint is bad
            click.echo(f"warning: passed over {name}: {reason}", err=True)
        if info.get("rejected_checkpoints"):
            click.echo(f"warning: resuming from {Path(info['resumed_from']).name} (step {info['start_step']}), the "
                       "newest checkpoint that verifies", err=True)
        if info.get("inputs_unchecked"):
            click.echo("warning: the run recorded no inputs.json (made before fnclass fingerprinted its inputs): its "
                       "data and files were not checked; they are recorded now", err=True)
        self.split = info.get("selection_split", "test")
        if self.mode != "normal":
            return
        cfg = info["config"]
        resumed = (f", resuming at step {info['start_step']} from {Path(info['resumed_from']).name}"
                   if info.get("resumed_from") else "")
        source = info.get("init_from")
        if source:
            head = (f"; the head is re-initialised from this run's key ({len(source['classes'])} classes there, "
                    f"{cfg.model.num_classes} here)" if source["head_reinitialised"] else "")
            self.console.print(f"starting from {source['path']} (step {source['step']}, {source['weights']} weights)"
                               f"{head}", highlight=False, soft_wrap=True)
        count = f"{len(info['members'])} members of " if info.get("members") else ""
        held = f"{info['val_images']} validation / " if info.get("val_images") else ""
        self.console.print(
            f"fnclass train: {count}{cfg.model.name} ({info['num_params'] / 1e6:.2f}M parameters) on {info['device']}, "
            f"{info['train_images']} train / {held}{info['test_images']} test images from {info['data_dir']}, "
            f"{info['steps_per_epoch']} steps/epoch x {cfg.train.epochs} epochs{resumed} -> {info['workdir']}",
            highlight=False)
        self.console.print(f"precision {info['precision']} ({info['precision_reason']})", highlight=False)
        plan = info.get("privacy")
        if plan:
            target = f"to spend epsilon {plan['target_epsilon']:g}" if plan["target_epsilon"] else "(no target epsilon)"
            self.console.print(
                f"DP-SGD {target} at delta {plan['delta']:g}: noise multiplier {plan['noise_multiplier']:.4f}, "
                f"clipping norm {plan['max_grad_norm']:g}, sampling rate {plan['sample_rate']:.5f} "
                f"({'Poisson, padded to ' + str(plan['max_batch_size']) if plan['poisson_sampling'] else 'shuffled'})"
                f", {plan['accountant'].upper()} accountant", highlight=False, soft_wrap=True)
        header = [name.replace("test", self.split) for name, _, _ in COLUMNS]
        if cfg.members.lr:
            self.base_lr = cfg.optim.lr
            header[5] = "lr scale"
            self.console.print("lr scale: the schedule's multiple of each member's swept optim.lr (its learning rate "
                               "is that lr times the scale)", highlight=False)
        self.console.print(_row(header), style="bold", highlight=False)
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                TextColumn("{task.fields[ips]:,.0f} img/s"), TextColumn("loss {task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]:.2e}"), TimeRemainingColumn(), console=self.console, transient=True)
            self.progress.start()

    def step(self, info):
        if self.progress is None:
            return
        self.loss = f"{info['loss']:.3f}" if "loss" in info else self.loss
        if self.task is None or info["epoch_step"] == 1 and self.progress.tasks[0].fields["epoch"] != info["epoch"] + 1:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("train", total=info["steps_per_epoch"], epoch=info["epoch"] + 1,
                                               ips=0.0, loss=self.loss, lr=info["lr"])
        self.progress.update(self.task, completed=info["epoch_step"], ips=info["images_per_second"],
                             loss=self.loss, lr=info["lr"])

    def epoch(self, row):
        if self.mode != "normal":
            return
        split = self.split
        values = [fmt.format(row[key]) if key in row else "-" for key, (_, _, fmt) in zip(  # "-": not evaluated
            ["epoch", "train_loss", "train_accuracy", f"{split}_loss", f"{split}_accuracy", "lr", "seconds"], COLUMNS)]
        if self.base_lr:
            values[5] = f"{row['lr'] / self.base_lr:.4f}"
        self.console.print(_row(values), highlight=False)
        if f"ema_{split}_accuracy" in row:
            self.console.print(f"{'':>7}EMA: {split} loss {row[f'ema_{split}_loss']:.4f}, {split} accuracy "
                               f"{row[f'ema_{split}_accuracy']:.2%}", highlight=False)
        if "epsilon" in row:
            overflow = f", {row['poisson_overflow']} sampled examples over the padded batch" if row.get(
                "poisson_overflow") else ""
            self.console.print(f"{'':>7}privacy spent: epsilon {row['epsilon']:.3f}{overflow}", highlight=False)
        if "members" in row and f"{split}_accuracy" in row:  # the evaluation columns are the ensemble's; the
            # members' spread follows
            self.console.print(f"{'':>7}{row['members']} members: {_spread(row, f'{split}_accuracy')}, ensemble "
                               f"{row[f'{split}_accuracy']:.2%}", highlight=False)
            for group in row.get("groups", []):
                setting = ", ".join(f"{k} = {v:g}" for k, v in group["hyperparameters"].items())
                self.console.print(f"{'':>9}{setting}: {_spread(group, '')}", highlight=False)

    def end(self, summary):
        if self.progress is not None:
            self.progress.stop()
        if self.mode == "json":
            click.echo(json.dumps(summary))
            return
        selection = summary.get("selection", "test_accuracy")  # the metric "best" was chosen on
        held_out = selection.endswith("val_accuracy")
        lines = [f"final test accuracy  {summary['test_accuracy']:.2%}" + (" (evaluated once)" if held_out else "")]
        if "test_accuracy_tta" in summary:
            lines.append(f"with TTA             {summary['test_accuracy_tta']:.2%}")
        if "ema_test_accuracy" in summary:
            tta = f" ({summary['ema_test_accuracy_tta']:.2%} TTA)" if "ema_test_accuracy_tta" in summary else ""
            lines.append(f"EMA test accuracy    {summary['ema_test_accuracy']:.2%}{tta}")
        if held_out:
            lines.append(f"final val accuracy   {summary['val_accuracy']:.2%}")
        if f"best_{selection}" in summary:
            lines.append(f"{'best ' + selection.replace('_', ' '):<20} {summary[f'best_{selection}']:.2%}")
        if "test_top5_accuracy" in summary:
            lines.append(f"test top-5 accuracy  {summary['test_top5_accuracy']:.2%}")
        if "members" in summary:
            lines = [f"members              {len(summary['members'])}: {_spread(summary, 'test_accuracy')}",
                     f"ensemble             {summary['ensemble_test_accuracy']:.2%} (mean of the members' logits)"]
            if "best_val_accuracy" in summary:
                lines.append(f"best val (ensemble)  {summary['best_val_accuracy']:.2%}")
            if "test_accuracy_tta" in summary:
                lines += [f"with TTA             {_spread(summary, 'test_accuracy_tta')}; ensemble "
                          f"{summary['ensemble_test_accuracy_tta']:.2%}"]
            for group in summary.get("groups", []):
                setting = ", ".join(f"{k} = {v:g}" for k, v in group["hyperparameters"].items())
                lines.append(f"  {setting:<19}{_spread(group, '')}")
        if "test_nll" in summary:  # the ensemble's, for members
            lines.append(f"test NLL, ECE, Brier {summary['test_nll']:.4f}, {summary['test_ece']:.4f}, "
                         f"{summary['test_brier']:.4f}" + (" (ensemble)" if "members" in summary else ""))
        if "calibration" in summary:
            fit, after = summary["calibration"], summary["calibration"]["test"]["after"]
            lines.append(f"temperature          {fit['temperature']:.4f} (fitted on {fit['fitted_on']}): test NLL "
                         f"{after['nll']:.4f}, ECE {after['ece']:.4f}, Brier {after['brier']:.4f}")
        if "privacy" in summary:
            dp = summary["privacy"]
            lines.append(f"privacy              epsilon {dp['epsilon']:.3f} at delta {dp['delta']:g} "
                         f"({dp['accountant'].upper()}, noise {dp['noise_multiplier']:.4f}, {dp['steps']} steps at "
                         f"rate {dp['sample_rate']:.5f})")
        ips = summary["images_per_second"]
        lines += [f"training time        {summary['train_seconds']:.1f} s"
                  + (f" (+{summary['compile_seconds']:.1f} s compile)" if summary["compile_seconds"] else ""),
                  f"throughput           {ips:,.0f} images/s" if ips else "throughput           -",
                  f"device               {summary['device']}, torch {summary['torch_version']}",
                  f"run directory        {summary['run_dir']}"]
        _show(self.console, "summary", lines, summary["per_class_accuracy"] if self.mode == "normal" else None)


def _spread(values: dict, prefix: str) -> str:
    """``85.12% ± 0.31 (84.70–85.50)``: mean ± sample std in points, min–max; a sweep's group adds ``(3 seeds)``,
    and a group of one seed is its value alone: ``84.70% (1 seed)``."""
    key = (lambda name: f"{prefix}_{name}") if prefix else (lambda name: name)
    count = values.get("members") if not prefix else None  # a group of a sweep: how many seeds it averages
    if count == 1:
        return f"{values[key('mean')]:.2%} (1 seed)"
    seeds = f" ({count} seeds)" if count else ""
    return (f"{values[key('mean')]:.2%} ± {100 * values[key('std')]:.2f} ({values[key('min')]:.2%}–"
            f"{values[key('max')]:.2%}){seeds}")


def _model_file(path: Path | None, model_name: str | None) -> Path:
    """The file to evaluate: CHECKPOINT, or the verified weights of the zoo entry ``--model`` names."""
    if (path is None) == (model_name is None):
        raise UsageProblem("give either a CHECKPOINT file or --model NAME (see `fnclass models`), not "
                           + ("both" if path else "neither"))
    if path is not None:
        return path
    from fnclass.run.zoo import weights_path

    return weights_path(model_name)


def _show(console: Console, title: str, lines: list[str], per_class: dict | None) -> None:
    """A panel and a per-class table on a terminal; the same facts as plain lines anywhere else."""
    if not console.is_terminal:
        for line in lines:
            console.print(line, highlight=False)
        for name, accuracy in (per_class or {}).items():
            console.print(f"accuracy {name:<20} {accuracy:.2%}", highlight=False)
        return
    console.print(Panel("\n".join(lines), title=title, expand=False), highlight=False)
    if per_class:
        console.print(_per_class_table(per_class))


def _per_class_table(per_class: dict) -> Table:
    """A table of test accuracy per class."""
    table = Table(title="test accuracy per class")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, accuracy in per_class.items():
        table.add_row(name, f"{accuracy:.2%}")
    return table


def _parse_seeds(text: str) -> list[int]:
    """``0-7``, ``0,3,5`` or ``0-3,8``: the seeds, in order, each once."""
    seeds = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            low, high = int(first), int(last) if last else int(first)
            if low < 0 or high < low or high - low >= 4096:
                raise ValueError
            seeds += [s for s in range(low, high + 1) if s not in seeds]
    except ValueError:
        raise UsageProblem(f"--seeds {text}: expected seeds >= 0 as a range or a list, e.g. --seeds 0-7 or "
                           "--seeds 0,3,5") from None
    return seeds


def _parse_sweep(text: str) -> str:
    """``optim.lr=0.05,0.1`` -> the ``--set`` override ``members.lr=[0.05, 0.1]``."""
    from fnclass.config import SECTION_CLASSES, SECTIONS, SWEEPS

    key, sep, values = text.partition("=")
    key = key.strip()
    known = {f"{section}.{field}" for section, cls in zip(SECTIONS, SECTION_CLASSES)
             for field in cls.__dataclass_fields__}
    sweepable = ", ".join(SWEEPS.values())
    if not sep or not values.strip():
        raise UsageProblem(f"--sweep {text}: expected KEY=V1,V2,..., e.g. --sweep optim.lr=0.05,0.1,0.2")
    if key not in SWEEPS.values():
        why = ("changes the model's shapes or the program, which is one for all members" if key in known
               else "is not a config key")
        raise UsageProblem(f"--sweep {key}: {key} {why}; sweeps take {sweepable} (run other settings one after "
                           "another)")
    try:
        numbers = [float(v) for v in values.split(",")]
    except ValueError:
        raise UsageProblem(f"--sweep {text}: the values must be numbers separated by commas") from None
    name = next(name for name, dotted in SWEEPS.items() if dotted == key)
    return f"members.{name}=[{', '.join(repr(v) for v in numbers)}]"


def _default_config(device: str) -> tuple[str, str]:
    """The shipped fast config on a GPU, cpu on the CPU, and the sentence that says so."""
    import torch

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    name = "fast" if on_gpu else "cpu"
    return name, f"no --config given: using the shipped {name} config ({'GPU' if on_gpu else 'CPU'})"


def _differences(given, recorded) -> list[str]:
    """``section.key: given vs recorded`` for every key where two configs differ."""
    a, b = config_to_dict(given), config_to_dict(recorded)
    # A key left out of the given config (model.num_classes: taken from the data) agrees with any recorded value,
    # and train.precision = "auto" with the choice the run recorded.
    return [f"{section}.{key} = {a[section].get(key)!r} here but {b[section].get(key)!r} in the run"
            for section in a for key in sorted(a[section]) if a[section].get(key) != b[section].get(key)
            and (section, key, a[section].get(key)) != ("train", "precision", "auto")]


def _finished(run_dir: Path, config, console: Console, reporter: RichReporter, data_dir, download: bool) -> bool:
    """Whether the run to resume has finished — its summary.json covers every epoch, at the step of its last
    checkpoint — with the inputs it recorded: then it says so and shows that summary, and nothing is trained or
    rewritten. A changed input is refused here as on any resume (:class:`fnclass.run.inputs.InputChanged`)."""
    import safetensors

    from fnclass.data import resolve_data_dir
    from fnclass.run import inputs

    summary_path, last = run_dir / "summary.json", run_dir / "checkpoints" / "last.safetensors"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        with safetensors.safe_open(last, "pt") as handle:
            step = int((handle.metadata() or {}).get("step", -1))
    except (OSError, ValueError, safetensors.SafetensorError):
        return False  # unreadable: the resume's own checks say what is wrong
    record = inputs.read_inputs(run_dir)
    if not isinstance(summary, dict) or summary.get("epochs") != config.train.epochs or \
            summary.get("steps") != step or record is None:
        return False
    folder = resolve_data_dir(data_dir or config.data.data_dir, config.data.dataset, download=download)
    inputs.check_inputs(record, config, folder)
    if reporter.mode == "normal":
        console.print(f"--resume {run_dir}: the run already finished its {config.train.epochs} epochs (step "
                      f"{summary.get('steps')}); nothing to train. Its summary (summary.json):", highlight=False)
    reporter.end(summary)
    return True


def _resume_config(run_dir: Path, config_path, overrides, out):
    """The recorded config of a run to resume, after checking that the given options agree with it."""
    recorded_path, checkpoints = run_dir / "config.toml", run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise UsageProblem(f"--resume {run_dir}: no such folder; give the folder a run was started in (its --out)")
    saved = (checkpoints / "last.safetensors").is_file() or any(checkpoints.glob("step-*.safetensors"))
    if not saved or not recorded_path.is_file():
        raise UsageProblem(f"--resume {run_dir}: no config.toml and checkpoints/last.safetensors there; "
                           "give the directory of a run that has saved a checkpoint")
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise UsageProblem(f"--out {out} differs from --resume {run_dir}: a resumed run continues in its own folder")
    from fnclass.models import resolve_config

    recorded = load_config(recorded_path)
    if config_path is not None or overrides:
        given = resolve_config(load_config(config_path if config_path is not None else recorded_path, overrides))
        differences = _differences(given, resolve_config(recorded))
        if differences:
            raise UsageProblem(f"--resume {run_dir}: {differences[0]}; drop that option to continue the run as it was"
                               " (or start a new run with --out)")
    return recorded


@click.command()
@options.config_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default runs/NAME-TIME).")
@options.device
@click.option("--seed", type=click.IntRange(min=0), help="Shorthand for --set train.seed=N.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), help="Continue the run in this directory.")
@options.data_dir
@options.no_download
@click.option("--seeds", "seeds_text", metavar="SEEDS",
              help="Train one member per seed at once under vmap, e.g. 0-7 or 0,3,5 (members.seeds).")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2",
              help="One member per value, vmapped: optim.lr, optim.weight_decay or train.label_smoothing "
                   "(a grid with --seeds and other --sweep options).")
@click.option("--members-per-pass", type=click.IntRange(min=1),
              help="Vmap this many members at a time within each step, to bound memory (members.per_pass).")
@click.option("--grad-stats-every", type=click.IntRange(min=1),
              help="Shorthand for --set train.grad_stats_every=N: log the gradient noise scale every N steps.")
@click.option("--init-from", type=click.Path(dir_okay=False, path_type=Path),
              help="Start from this checkpoint's or export's weights (fine-tuning; train.init_from). A head for a "
                   "different number of classes is re-initialised.")
@click.option("--logger", type=click.Choice(["tensorboard"]),
              help="Also write TensorBoard events to RUN_DIR/tb (train.logger; needs fnclass[tensorboard]).")
@click.option("--quiet", is_flag=True, help="Print only the summary.")
@options.as_json("only the summary")
@one_line_errors
def train(config_path, overrides, out, device, seed, resume, data_dir, no_download, seeds_text, sweeps,
          members_per_pass, grad_stats_every, init_from, logger, quiet, as_json):
    """Train a model on CIFAR and write a run directory.

    \b
    \b
    Examples:
      fnclass train --config cpu --data-dir ../shared/data/cifar10 --out runs/cpu
      fnclass train --config cpu --seeds 0-3 --out runs/cpu-seeds
      fnclass train --config cpu --sweep optim.lr=0.1,0.2,0.4 --seeds 0,1 --out runs/cpu-lr
    """
    from fnclass.training.program import TrainingDiverged, TrainingInterrupted
    from fnclass.training.program import train as run_training

    console = Console(stderr=as_json)
    overrides = list(overrides) + ([f"train.seed={seed}"] if seed is not None else [])
    overrides += [f"train.grad_stats_every={grad_stats_every}"] if grad_stats_every is not None else []
    if seeds_text is not None:
        overrides.append(f"members.seeds={_parse_seeds(seeds_text)}")
    overrides += [_parse_sweep(text) for text in sweeps]
    overrides += [f"members.per_pass={members_per_pass}"] if members_per_pass is not None else []
    overrides += [f"train.logger={logger}"] if logger is not None else []
    overrides += [f"train.init_from={toml_value(str(init_from))}"] if init_from is not None else []
    if resume is not None:
        config = _resume_config(resume, config_path, overrides, out)
        workdir = resume
    else:
        if config_path is None:
            config_path, note = _default_config(device)
            if not (quiet or as_json):
                console.print(note, highlight=False)
        from fnclass.models import resolve_config

        config = resolve_config(load_config(config_path, overrides), source=config_path)
        workdir = out or Path("runs") / f"{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (workdir / "checkpoints" / "last.safetensors").exists():
            raise UsageProblem(f"--out {workdir} already holds a run: continue it with --resume {workdir} "
                               "or choose another --out")
    reporter = RichReporter(console, mode="json" if as_json else "quiet" if quiet else "normal")
    if resume is not None and _finished(resume, config, console, reporter, data_dir, not no_download):
        return
    try:
        run_training(config, workdir, data_dir=data_dir, device=device, download=not no_download,
                     resume=resume is not None, reporter=reporter)
    except TrainingDiverged as error:
        if reporter.progress is not None:
            reporter.progress.stop()
        raise Diverged(str(error)) from None
    except TrainingInterrupted as stop:
        if reporter.progress is not None:
            reporter.progress.stop()
        said = f"interrupted at step {stop.step}: saved {stop.checkpoint}" if stop.step is not None else str(stop)
        click.echo(f"{said}; continue with `fnclass train --resume {workdir}`", err=True)
        raise SystemExit(130) from None


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@options.as_json("the facts")
@one_line_errors
def info(checkpoint, as_json):
    """Show what a checkpoint holds (model, step, classes, normalisation).

    \b
    Example:
      fnclass info runs/cpu/checkpoints/last.safetensors
    """
    from fnclass.core.tree import num_params
    from fnclass.data import file_sha256
    from fnclass.run.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    facts = {"file": str(checkpoint), "sha256": file_sha256(checkpoint), "bytes": Path(checkpoint).stat().st_size,
             "model": ckpt.config.model.name, "num_params": num_params(ckpt.params), "step": ckpt.step,
             "classes": list(ckpt.classes), "mean": list(ckpt.mean), "std": list(ckpt.std),
             "fnclass_version": ckpt.metadata.get("fnclass_version"),
             "has_optimizer_state": any(k.startswith("opt_state.") for k in ckpt.tensors),
             "config": dataclasses.asdict(ckpt.config)}
    if as_json:
        click.echo(json.dumps(facts, default=list))
        return
    table = Table(title=str(checkpoint), show_header=False)
    for key in ("model", "num_params", "step", "classes", "mean", "std", "fnclass_version", "has_optimizer_state",
                "bytes", "sha256"):
        value = facts[key]
        if key in ("mean", "std"):
            value = ", ".join(f"{v:.4f}" for v in value)
        elif key == "classes":
            value = ", ".join(value)
        table.add_row(key, str(value))
    Console().print(table)


__all__ = ["train", "info"]
