"""The training program: ``train(config, workdir)`` — set up, one call per epoch, finish.

Everything random derives from ``train.seed`` and the step number, so a resumed run replays the same batches
and ends with the same parameters. The pieces: :mod:`fnclass.recipe` (what to build), :mod:`fnclass.step`
(the pure step), :mod:`fnclass.evaluate` (metrics, TTA) and :mod:`fnclass.run` (every file written).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import NamedTuple

import torch

from fnclass import data, random, recipe, tree
from fnclass._version import __version__
from fnclass.augment import alternating_flips, augment
from fnclass.config import Config, ConfigError
from fnclass.evaluate import evaluate_dataset
from fnclass.io import device_name, fault_point, pick_device, synchronize
from fnclass.models import resolve_config
from fnclass.run import Reporter, RunDirectory
from fnclass.step import TrainState, create_train_state, make_eval_step, make_train_step


class TrainingDiverged(Exception):
    """A loss or gradient became nan or inf; the last good checkpoint is kept. The CLI exits with code 3."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(Exception):
    """Training was stopped with Ctrl-C; ``last.safetensors`` holds the state at ``step``."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted at step {step}; saved {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class TrainResult(NamedTuple):
    """What :func:`train` returns: the final TrainState and the summary (also in ``summary.json``)."""

    train_state: TrainState
    summary: dict


class _Data(NamedTuple):
    """A run's data on its device: uint8 NHWC images, labels, the normalisation and where it came from."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: tuple
    std: tuple
    mean_t: torch.Tensor
    std_t: torch.Tensor
    classes: tuple
    folder: Path


def train(config: Config, workdir: str | Path, *, data_dir: str | None = None, device: str = "auto",
          download: bool = True, resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Train and evaluate a model as ``config`` says, writing the run directory ``workdir``.

    The run directory gets ``config.toml`` (resolved), ``metrics.jsonl``, ``summary.json``,
    ``checkpoints/last.safetensors`` and ``best.safetensors``, and ``plots/curves.png``.

    Args:
      config: the run config (its model defaults are filled in here).
      workdir: the run directory (created if needed).
      data_dir: a canonical data folder; else the config's, ``$FNCLASS_DATA`` or the cache.
      device: ``auto``, ``cpu`` or ``cuda``.
      download: allow fetching CIFAR-10/100 through torchvision when no data folder has it.
      resume: continue from the run directory's last checkpoint.
      reporter: receives progress (see :class:`fnclass.run.Reporter`).

    Returns:
      ``TrainResult(train_state, summary)``.

    Raises:
      TrainingInterrupted: on Ctrl-C, after writing ``last.safetensors``.
      TrainingDiverged: when a loss or gradient is not finite and ``train.nan_policy = "stop"`` (the last good
        checkpoint stays). Non-finite values are flagged on the device at every step and looked at where the
        loop synchronises anyway: logging steps, checkpoint saves and epoch ends.
    """
    config = resolve_config(config)
    dev = pick_device(device)
    run = RunDirectory(workdir, config, reporter=reporter)
    ds = _load_data(config, data_dir, download, dev)
    n_train, batch_size = len(ds.train_images), config.train.batch_size
    steps_per_epoch = n_train // batch_size  # the last partial batch is dropped: static shapes
    model, loss_fn = recipe.create_model(config), recipe.create_loss(config)
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, steps_per_epoch, config.train.epochs)
    train_state = create_train_state(model, optimizer, random.key(config.train.seed))
    train_state = tree.tree_to(run.restore(train_state) if resume else train_state, dev)
    start_step, clock = int(train_state.step), {"whitening": 0.0, "compile": 0.0, "train": 0.0, "final_eval": 0.0}
    if model.data_init is not None and not resume:
        tick = time.perf_counter()
        normalize = lambda images: _normalized(ds, images)
        train_state = train_state._replace(state=model.data_init(train_state.state, ds.train_images, normalize))
        synchronize(dev)
        clock["whitening"] = time.perf_counter() - tick
    options = dict(compile=config.train.compile, precision=config.train.precision,
                   channels_last=config.train.channels_last)
    train_step = make_train_step(model, loss_fn, optimizer, skip_nonfinite=config.train.nan_policy == "skip",
                                 **options)
    eval_step = make_eval_step(model, **options)
    schedule = recipe.create_schedule(config.optim, steps_per_epoch, config.train.epochs)
    epoch_loop = _EpochLoop(config, ds, train_state.key, train_step, schedule, run, model, steps_per_epoch)
    run.start(step=start_step, classes=ds.classes, mean=ds.mean, std=ds.std,
              input_size=tuple(ds.train_images.shape[1:3]),
              info={"device": str(dev), "data_dir": str(ds.folder), "train_images": n_train,
                    "test_images": len(ds.test_images), "steps_per_epoch": steps_per_epoch,
                    "total_steps": steps_per_epoch * config.train.epochs,
                    "num_params": tree.num_params(train_state.params), "start_step": start_step,
                    "resumed_from": str(run.resumed_from) if resume else None, "rejected_checkpoints": run.rejected})
    try:  # the run directory's lock is released however the run ends
        if config.train.compile:
            clock["compile"] = epoch_loop.compile(train_state, dev)
        best, last_eval = run.best_accuracy(), None
        tta = (1 + config.train.tta_translate) if config.train.tta else 0
        first_epoch, progress = start_step // steps_per_epoch, run.progress
        if start_step and start_step % steps_per_epoch == 0 and not run.has_epoch_row(start_step):
            first_epoch -= 1  # saved at an epoch's end before its evaluation: evaluate and log that epoch first
        for epoch in range(first_epoch, config.train.epochs):
            train_state, seconds, train_metrics = epoch_loop(train_state, epoch, dev, progress)
            progress = None  # only the epoch a run resumes in started before this process
            clock["train"] += seconds
            final = epoch + 1 == config.train.epochs
            tick = time.perf_counter()
            last_eval = _evaluate(eval_step, train_state, ds, config, tta if final else 0)
            clock["final_eval"] = time.perf_counter() - tick  # evaluate_dataset ends with .item(): synchronised
            lr = float(schedule(train_state.step - 1))
            row = _epoch_row(train_state, epoch, train_metrics, last_eval, lr, seconds)
            run.end_epoch(row, train_state, best=best is None or row["test_accuracy"] > best)
            best = row["test_accuracy"] if best is None else max(best, row["test_accuracy"])
        if last_eval is None:  # resumed a finished run: evaluate what is there
            last_eval = _evaluate(eval_step, train_state, ds, config, tta)
            best = max(best or 0.0, last_eval["accuracy"])
        summary = _summary(config, train_state, last_eval, best, clock, epoch_loop.images_seen, start_step, dev, ds,
                           run)
        run.finish(summary)
    except KeyboardInterrupt:
        if epoch_loop.latest is not None:
            epoch_loop.check_finite()  # a state after a non-finite step is never saved
            train_state = epoch_loop.latest  # the state after the last finished step
        run.save(train_state, epoch_loop.progress())
        raise TrainingInterrupted(int(train_state.step), run.last) from None
    finally:
        run.close()
    return TrainResult(train_state, summary)


def _load_data(config: Config, data_dir, download: bool, dev: torch.device) -> _Data:
    """The run's data set on the device, checked against the config."""
    folder = data.resolve_data_dir(data_dir or config.data.data_dir, config.data.dataset, download=download)
    dataset = data.load_dataset(folder, train_limit=config.data.train_limit, test_limit=config.data.test_limit)
    if len(dataset.classes) != config.model.num_classes:
        raise ConfigError(f"model.num_classes = {config.model.num_classes} but {folder} has "
                          f"{len(dataset.classes)} classes: set model.num_classes = {len(dataset.classes)}")
    if config.train.batch_size > len(dataset.train_images):
        raise ConfigError(f"train.batch_size = {config.train.batch_size} is more than the "
                          f"{len(dataset.train_images)} training images: set train.batch_size <= "
                          f"{len(dataset.train_images)} or use more data (data.train_limit)")
    mean, std = data.channel_stats(dataset.train_images)
    # Made once on the device: a Python tuple would be copied to the GPU (and wait for it) at every step.
    mean_t, std_t = torch.tensor(mean, device=dev).view(1, 3, 1, 1), torch.tensor(std, device=dev).view(1, 3, 1, 1)
    return _Data(dataset.train_images.to(dev), dataset.train_labels.to(dev), dataset.test_images.to(dev),
                 dataset.test_labels.to(dev), mean, std, mean_t, std_t, dataset.classes, folder)


def _normalized(ds: _Data, images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images -> normalised float NCHW."""
    return data.normalize(images, ds.mean_t, ds.std_t)


class _EpochLoop:
    """One epoch of steps: batches cut and augmented on the device from ``fold_in(key, step)``, metrics kept there."""

    def __init__(self, config: Config, ds: _Data, key, train_step, schedule, run: RunDirectory, model,
                 steps_per_epoch: int):
        self.config, self.ds, self.train_step, self.schedule, self.run_dir = config, ds, train_step, schedule, run
        self.steps_per_epoch, self.batch_size, self.images_seen = steps_per_epoch, config.train.batch_size, 0
        self.order_root, self.step_root = random.split(key)
        n_train = len(ds.train_images)
        # Alternating flips: which half of the data is mirrored in even epochs, drawn once for the run.
        self.first_flips = (random.bernoulli(random.fold_in(self.order_root, -1), 0.5, (n_train,))
                            if config.data.alternate_flips else None)
        self.grad_stats = _GradStats(config, ds, model) if config.train.grad_stats_every else None
        self.latest = None  # the state after the last finished step, for a Ctrl-C between steps
        self.first_bad = None
        self.sums: dict = {}  # the epoch's sums so far, on the device

    def batch(self, idx: torch.Tensor, epoch: int, key) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented, normalised batch of the examples ``idx``."""
        flips = None if self.first_flips is None else alternating_flips(self.first_flips, idx, epoch)
        images = augment(key, _normalized(self.ds, self.ds.train_images[idx]), self.config.data, flip=flips)
        return images, self.ds.train_labels[idx]

    def compile(self, train_state: TrainState, dev) -> float:
        """Compile the step on a throwaway call (the step is pure: its result is dropped); the seconds it took.

        Every real step is then timed, as airbench's clock includes its first step.
        """
        tick = time.perf_counter()
        key = random.fold_in(self.step_root, -1)  # no real step uses a negative step number
        self.train_step(train_state, self.batch(torch.arange(self.batch_size, device=dev), 0, key), key)
        synchronize(dev)
        return time.perf_counter() - tick

    def __call__(self, train_state: TrainState, epoch: int, dev,
                 progress: dict | None = None) -> tuple[TrainState, float, dict]:
        """The rest of ``epoch`` from ``train_state.step``: the new state, the seconds and the summed metrics.

        ``progress`` holds the sums of the epoch's steps run before a resume (from the checkpoint), so the
        epoch's train loss and accuracy add up as in an uninterrupted run.
        """
        config, n_train = self.config, len(self.ds.train_images)
        progress = progress if progress and progress.get("epoch") == epoch else {}
        order = random.permutation(random.fold_in(self.order_root, epoch), n_train)
        self.sums = {"loss_sum": torch.tensor(float(progress.get("loss_sum", 0.0)), device=dev),
                     "correct": torch.tensor(int(progress.get("correct", 0)), dtype=torch.int64, device=dev),
                     "skipped": torch.tensor(int(progress.get("skipped", 0)), dtype=torch.int64, device=dev),
                     "images": int(progress.get("images", 0)), "epoch": epoch}
        loss_sum, correct, skipped = self.sums["loss_sum"], self.sums["correct"], self.sums["skipped"]
        self.first_bad = torch.zeros((), dtype=torch.int64, device=dev)  # the first non-finite step (0: none)
        images, start = 0, time.perf_counter()
        step, self.latest = int(train_state.step), train_state
        for epoch_step in range(step - epoch * self.steps_per_epoch, self.steps_per_epoch):
            aug_key, model_key = random.split(random.fold_in(self.step_root, step))
            idx = order[epoch_step * self.batch_size:(epoch_step + 1) * self.batch_size]
            train_state, metrics = self.train_step(train_state, self.batch(idx, epoch, aug_key), model_key)
            self.latest = train_state
            finite = metrics["finite"]
            # Flags kept on the device: nothing here waits for the step to finish.
            self.first_bad = torch.where((self.first_bad == 0) & ~finite, train_state.step, self.first_bad)
            skipped += ~finite
            loss_sum += torch.where(finite, metrics["loss"], 0.0) * self.batch_size
            correct += metrics["correct"]
            step, images = step + 1, images + self.batch_size
            self.sums["images"] += self.batch_size
            fault_point("step")
            log = config.train.log_every_steps and step % config.train.log_every_steps == 0
            if log:
                synchronize(dev)
                self.check_finite()
            info = {"step": step, "epoch": epoch, "epoch_step": epoch_step + 1,
                    "steps_per_epoch": self.steps_per_epoch, "lr": float(self.schedule(step - 1)),
                    "images_per_second": images / max(time.perf_counter() - start, 1e-9)}
            if log:
                loss = metrics["loss"].item()
                info["loss"] = loss
                row = {"kind": "step", "step": step, "epoch": epoch, "loss": loss if math.isfinite(loss) else None,
                       "lr": info["lr"]}
                if config.train.nan_policy == "skip":
                    row["skipped_steps"] = int(skipped)  # this epoch's, so far
                self.run_dir.log(row)
            if self.grad_stats is not None and step % config.train.grad_stats_every == 0:
                self.run_dir.log({"kind": "grad_stats", "step": step, "epoch": epoch, **self.grad_stats(train_state)})
            self.run_dir.step(info)
            if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
                self.check_finite()  # a state after a non-finite step is never saved
                self.run_dir.save(train_state, self.progress())
        synchronize(dev)  # steps run asynchronously: the epoch ends when the GPU is done
        seconds = time.perf_counter() - start
        self.images_seen += images
        self.check_finite()  # before evaluating and saving: the last good checkpoint stays
        skipped, epoch_images = int(skipped), self.sums["images"]
        counted = epoch_images - skipped * self.batch_size  # the loss of a skipped step is not finite
        metrics = {"loss": loss_sum.item() / counted if counted else float("nan"),
                   "accuracy": correct.item() / max(epoch_images, 1), "skipped_steps": skipped}
        return train_state, seconds, metrics

    def progress(self) -> dict | None:
        """The epoch's sums so far as JSON numbers (saved with a mid-epoch checkpoint); None before any epoch."""
        if not self.sums:
            return None
        return {"loss_sum": float(self.sums["loss_sum"]), "correct": int(self.sums["correct"]),
                "skipped": int(self.sums["skipped"]), "images": self.sums["images"], "epoch": self.sums["epoch"]}

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if a step of this epoch had a non-finite loss or gradient (policy stop).

        Called where the loop synchronises anyway, so detection comes at most ``min(train.log_every_steps,
        checkpoint.every_steps, steps left in the epoch)`` steps late; the message names the exact step.
        """
        if self.config.train.nan_policy != "stop" or self.first_bad is None:
            return
        bad = int(self.first_bad)
        if bad:
            optim, last = self.config.optim, self.run_dir.last
            kept = f"{last} holds the last good state" if last.is_file() else "no checkpoint was written before it"
            raise TrainingDiverged(
                f"training diverged: the loss or a gradient is nan/inf at step {bad} (epoch "
                f"{(bad - 1) // self.steps_per_epoch + 1}); likely causes: a learning rate too high (optim.lr = "
                f"{optim.lr}), no gradient clipping (optim.clip_norm = {optim.clip_norm}), bf16 overflow "
                f"(train.precision = {self.config.train.precision!r}) or bad input data; {kept}; lower optim.lr, "
                "or set train.nan_policy = \"skip\" to skip such updates",
                step=bad)


class _GradStats:
    """Noise scale and per-layer-group gradient norms of a fixed probe batch (BatchNorm in eval mode)."""

    def __init__(self, config: Config, ds: _Data, model):
        probe = slice(0, min(config.train.grad_stats_examples, len(ds.train_images)))
        self.images, self.labels = _normalized(ds, ds.train_images[probe]), ds.train_labels[probe]
        self.model, self.chunk_size = model, config.train.eval_batch_size

    def __call__(self, train_state: TrainState) -> dict:
        from fnclass.analysis import gradient_statistics  # analysis is a program of its own; only this uses it

        stats = gradient_statistics(self.model, train_state.params, train_state.state, self.images, self.labels,
                                    cosine=False, chunk_size=self.chunk_size)
        return {"noise_scale": stats["noise_scale"]["b_simple"],
                "grad_norm": float(stats["per_example"]["grad_norm"].mean()),
                "group_grad_norms": {g: float(n.mean()) for g, n in stats["per_example"]["group_norms"].items()}}


def _evaluate(eval_step, train_state: TrainState, ds: _Data, config: Config, tta: int) -> dict:
    """Metrics of the test split."""
    return evaluate_dataset(eval_step, train_state.params, train_state.state, ds.test_images, ds.test_labels,
                            mean=ds.mean_t, std=ds.std_t, batch_size=config.train.eval_batch_size, tta=tta)


def _epoch_row(train_state: TrainState, epoch: int, train_metrics: dict, result: dict, lr: float,
               seconds: float) -> dict:
    """The metrics.jsonl row of an epoch."""
    row = {"kind": "epoch", "step": int(train_state.step), "epoch": epoch + 1, "train_loss": train_metrics["loss"],
           "train_accuracy": train_metrics["accuracy"], "test_loss": result["loss"],
           "test_accuracy": result["accuracy"], "lr": lr, "seconds": seconds,
           "skipped_steps": train_metrics["skipped_steps"]}
    if "tta_accuracy" in result:
        row["test_accuracy_tta"] = result["tta_accuracy"]
    return row


def _summary(config: Config, train_state: TrainState, result: dict, best, clock: dict, images_seen: int,
             start_step: int, dev, ds: _Data, run: RunDirectory) -> dict:
    """The summary.json contents."""
    summary = {
        "test_accuracy": result["accuracy"], "best_test_accuracy": best, "test_loss": result["loss"],
        "train_seconds": clock["train"], "compile_seconds": clock["compile"], "whitening_seconds": clock["whitening"],
        "final_eval_seconds": clock["final_eval"],
        "images_per_second": images_seen / clock["train"] if clock["train"] else None,
        "steps": int(train_state.step), "epochs": config.train.epochs, "resumed_from_step": start_step or None,
        "resumed_from_checkpoint": run.resumed_from.name if run.resumed_from else None,
        "skipped_steps": sum(row.get("skipped_steps", 0) for row in run.epoch_rows()),
        "nan_policy": config.train.nan_policy,
        "device": device_name(dev), "torch_version": torch.__version__, "fnclass_version": __version__,
        "seed": config.train.seed, "num_params": tree.num_params(train_state.params),
        "model": config.model.name, "data_dir": str(ds.folder), "train_images": len(ds.train_images),
        "test_images": len(ds.test_images),
        "per_class_accuracy": dict(zip(ds.classes, result["per_class_accuracy"])), "run_dir": str(run.path),
    }
    if "tta_accuracy" in result:
        summary["test_accuracy_tta"] = result["tta_accuracy"]
    return summary


__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted", "train"]
