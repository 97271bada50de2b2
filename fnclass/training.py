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
from fnclass.io import device_name, pick_device, synchronize
from fnclass.models import resolve_config
from fnclass.run import Reporter, RunDirectory
from fnclass.step import TrainState, create_train_state, make_eval_step, make_train_step


class TrainingDiverged(Exception):
    """The train loss became nan or inf; the last good checkpoint is kept. The CLI exits with code 3."""


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
      TrainingDiverged: when the train loss is not finite (the last good checkpoint stays).
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
    train_step, eval_step = make_train_step(model, loss_fn, optimizer, **options), make_eval_step(model, **options)
    schedule = recipe.create_schedule(config.optim, steps_per_epoch, config.train.epochs)
    epoch_loop = _EpochLoop(config, ds, train_state.key, train_step, schedule, run, model, steps_per_epoch)
    run.start(step=start_step, classes=ds.classes, mean=ds.mean, std=ds.std,
              input_size=tuple(ds.train_images.shape[1:3]),
              info={"device": str(dev), "data_dir": str(ds.folder), "train_images": n_train,
                    "test_images": len(ds.test_images), "steps_per_epoch": steps_per_epoch,
                    "total_steps": steps_per_epoch * config.train.epochs,
                    "num_params": tree.num_params(train_state.params), "start_step": start_step})
    try:  # the run directory's lock is released however the run ends
        if config.train.compile:
            clock["compile"] = epoch_loop.compile(train_state, dev)
        best, last_eval = run.best_accuracy(), None
        tta = (1 + config.train.tta_translate) if config.train.tta else 0
        for epoch in range(start_step // steps_per_epoch, config.train.epochs):
            train_state, seconds, train_metrics = epoch_loop(train_state, epoch, dev)
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
            train_state = epoch_loop.latest  # the state after the last finished step
        run.save(train_state)
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

    def __call__(self, train_state: TrainState, epoch: int, dev) -> tuple[TrainState, float, dict]:
        """The rest of ``epoch`` from ``train_state.step``: the new state, the seconds and the summed metrics."""
        config, n_train = self.config, len(self.ds.train_images)
        order = random.permutation(random.fold_in(self.order_root, epoch), n_train)
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        images, start = 0, time.perf_counter()
        step, self.latest = int(train_state.step), train_state
        for epoch_step in range(step - epoch * self.steps_per_epoch, self.steps_per_epoch):
            aug_key, model_key = random.split(random.fold_in(self.step_root, step))
            idx = order[epoch_step * self.batch_size:(epoch_step + 1) * self.batch_size]
            train_state, metrics = self.train_step(train_state, self.batch(idx, epoch, aug_key), model_key)
            self.latest = train_state
            loss_sum += metrics["loss"] * self.batch_size
            correct += metrics["correct"]
            step, images = step + 1, images + self.batch_size
            log = config.train.log_every_steps and step % config.train.log_every_steps == 0
            if log:
                synchronize(dev)
            info = {"step": step, "epoch": epoch, "epoch_step": epoch_step + 1,
                    "steps_per_epoch": self.steps_per_epoch, "lr": float(self.schedule(step - 1)),
                    "images_per_second": images / max(time.perf_counter() - start, 1e-9)}
            if log:
                info["loss"] = metrics["loss"].item()
                self.run_dir.log({"kind": "step", "step": step, "epoch": epoch, "loss": info["loss"], "lr": info["lr"]})
            if self.grad_stats is not None and step % config.train.grad_stats_every == 0:
                self.run_dir.log({"kind": "grad_stats", "step": step, "epoch": epoch, **self.grad_stats(train_state)})
            self.run_dir.step(info)
            if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
                self.run_dir.save(train_state)
        synchronize(dev)  # steps run asynchronously: the epoch ends when the GPU is done
        seconds = time.perf_counter() - start
        self.images_seen += images
        train_loss = loss_sum.item() / max(images, 1)
        if not math.isfinite(train_loss):  # checked before saving: the last good checkpoint stays
            raise TrainingDiverged(f"training diverged: the train loss is {train_loss} in epoch {epoch + 1}; lower "
                                   f"optim.lr (now {config.optim.lr}) or set optim.clip_norm")
        return train_state, seconds, {"loss": train_loss, "accuracy": correct.item() / max(images, 1)}


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
           "test_accuracy": result["accuracy"], "lr": lr, "seconds": seconds}
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
