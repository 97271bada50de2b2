"""The epoch loop every training program shares: the run's data on the device, batches cut and augmented from
``fold_in(key, step)``, steps, the non-finite checks, metrics lines and mid-epoch checkpoints.

One model or K stacked members (:mod:`fnclass.training.members`) run through the same loop: a member's batches and keys
are exactly those of the single run with its seed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import NamedTuple

import torch

from fnclass import data, distributed, privacy
from fnclass.config import Config, ConfigError
from fnclass.core import random
from fnclass.core.augment import alternating_flips, augment, mix_batch
from fnclass.io import fault_point, synchronize
from fnclass.run.directory import RunDirectory
from fnclass.training.step import TrainState

MIX = 0x313  # folded into a step's augmentation key for mixup/CutMix, so crops and flips keep their keys
PUBLIC_NORMALIZATION = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # pixel values in [0, 1] to about [-2, 2]
SAMPLE = 0x5A3  # folded into a step's augmentation key for its Poisson sample ([privacy])
AUGMULT = 0xA06  # folded into a step's augmentation key with each augmented copy's index ([privacy] augmult > 1)


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


class RunData(NamedTuple):
    """A run's data on its device: uint8 NHWC images, labels, the normalisation and where it came from.

    With ``data.val_size``, ``val_images``/``val_labels`` are the held-out part of the training split (not in
    ``train_images``, and not in the normalisation statistics).
    """

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
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    @property
    def selection_split(self) -> str:
        """The split evaluated every epoch and that "best" is chosen on: ``"val"`` when held out, else ``"test"``."""
        return "test" if self.val_images is None else "val"

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``"val"`` or ``"test"``."""
        return (self.val_images, self.val_labels) if name == "val" else (self.test_images, self.test_labels)


def load_run_data(config: Config, data_dir, download: bool, dev: torch.device) -> tuple[Config, RunData]:
    """The run's data set on the device, checked against the config, and the config completed from it.

    ``model.num_classes``, when left out, becomes the number of the data folder's classes. The training images are
    the whole split, its first ``data.train_limit`` or the rows ``data.train_indices`` selects (in sorted order);
    ``data.val_size`` holds its images out of those.
    """
    folder = data.resolve_data_dir(data_dir or config.data.data_dir, config.data.dataset, download=download)
    dataset = data.load_dataset(folder, train_limit=config.data.train_limit, test_limit=config.data.test_limit,
                                train_indices=config.data.train_indices)
    if config.model.num_classes not in (None, len(dataset.classes)):
        raise ConfigError(f"model.num_classes = {config.model.num_classes} but {folder} has "
                          f"{len(dataset.classes)} classes: set model.num_classes = {len(dataset.classes)} "
                          "(or leave it out)")
    val_images = val_labels = None
    if config.data.val_size:
        train_idx, val_idx = data.validation_split(dataset.train_labels, config.data.val_size, config.data.val_seed)
        val_images, val_labels = dataset.train_images[val_idx].to(dev), dataset.train_labels[val_idx].to(dev)
        dataset = dataset._replace(train_images=dataset.train_images[train_idx],
                                   train_labels=dataset.train_labels[train_idx])
    if config.train.batch_size > len(dataset.train_images):
        more = ("select more images (data.train_indices)" if config.data.train_indices
                else "use more data (data.train_limit)")
        raise ConfigError(f"train.batch_size = {config.train.batch_size} is more than the "
                          f"{len(dataset.train_images)} training images: set train.batch_size <= "
                          f"{len(dataset.train_images)} or {more}")
    # Under [privacy] the training images' statistics would leak: a fixed, data-independent normalisation instead.
    mean, std = PUBLIC_NORMALIZATION if config.privacy.enabled else data.channel_stats(dataset.train_images)
    # Made once on the device: a Python tuple would be copied to the GPU (and wait for it) at every step.
    mean_t, std_t = torch.tensor(mean, device=dev).view(1, 3, 1, 1), torch.tensor(std, device=dev).view(1, 3, 1, 1)
    if config.model.num_classes is None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                       num_classes=len(dataset.classes)))
    return config, RunData(dataset.train_images.to(dev), dataset.train_labels.to(dev), dataset.test_images.to(dev),
                           dataset.test_labels.to(dev), mean, std, mean_t, std_t, dataset.classes, folder,
                           val_images, val_labels)


def normalized(ds: RunData, images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images -> normalised float NCHW."""
    return data.normalize(images, ds.mean_t, ds.std_t)


class EpochLoop:
    """One epoch of steps: batches cut and augmented on the device from ``fold_in(key, step)``, metrics kept there.

    ``key`` is the run's key (one model) or the members' keys stacked ``(K, 2)``; then ``train_step`` is a
    :func:`fnclass.training.step.make_members_step` step, called with ``hyper`` (the swept values, ``(K,)`` tensors), each
    member gets the batches and keys of the single run with its key, and sums, flags and logged lines are per
    member (``member_names`` name them in messages).
    """

    def __init__(self, config: Config, ds: RunData, key, train_step, schedule, run: RunDirectory, model,
                 steps_per_epoch: int, *, hyper: dict | None = None, member_names: list[str] | None = None,
                 lr_scales: list[float] | None = None, process=None, privacy_plan: privacy.Plan | None = None,
                 privacy_secret: torch.Tensor | None = None):
        self.config, self.ds, self.train_step, self.schedule, self.run_dir = config, ds, train_step, schedule, run
        # DP-SGD: Poisson batches padded to privacy_plan.max_batch_size, augmult copies of each image
        self.privacy_plan, self.privacy_secret = privacy_plan, privacy_secret  # the secret draws the samples
        self.poisson = privacy_plan is not None and privacy_plan.poisson_sampling
        self.steps_per_epoch, self.batch_size, self.images_seen = steps_per_epoch, config.train.batch_size, 0
        self.members = key.ndim == 2
        self.process = process  # data parallel: each step gets this process's shard of the global batch
        self.hyper, self.member_names = hyper or {}, member_names or []
        self.lr_scales = lr_scales or [1.0] * (len(key) if self.members else 1)  # a member's lr / the schedule's
        roots = [random.split(k) for k in (list(key) if self.members else [key])]
        self.order_roots, self.step_roots = [r[0] for r in roots], [r[1] for r in roots]
        n_train = len(ds.train_images)
        # Alternating flips: which half of the data is mirrored in even epochs, drawn once for the run.
        self.first_flips = ([random.bernoulli(random.fold_in(root, -1), 0.5, (n_train,)) for root in self.order_roots]
                            if config.data.alternate_flips else None)
        self.grad_stats = GradStats(config, ds, model) if config.train.grad_stats_every else None
        self.latest = None  # the state after the last finished step, for a Ctrl-C between steps
        self.first_bad = None
        self.sums: dict = {}  # the epoch's sums so far, on the device
        self.overflow = 0  # sampled examples a padded Poisson batch could not hold ([privacy]; a device tensor)
        self.sampled = None  # the real examples of the last Poisson batch (a device tensor)

    def first_epoch(self, start_step: int) -> int:
        """The epoch a run starting at ``start_step`` begins with.

        A checkpoint saved at an epoch's last step before that epoch's evaluation (every_steps, Ctrl-C) has no
        epoch row yet: the run evaluates and logs that epoch first.
        """
        epoch = start_step // self.steps_per_epoch
        if start_step and start_step % self.steps_per_epoch == 0 and not self.run_dir.has_epoch_row(start_step):
            epoch -= 1
        return epoch

    def batch(self, idx: torch.Tensor, epoch: int, key, member: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented, normalised batch of the examples ``idx`` (for ``member``'s alternating flips).

        With mixup or CutMix (``data.mixup_alpha``, ``data.cutmix_alpha``) the labels are soft targets,
        ``(B, classes)`` float rows, mixed from ``fold_in(key, MIX)`` (the other augmentations' keys are unchanged).
        """
        cfg = self.config.data
        flips = None if self.first_flips is None else alternating_flips(self.first_flips[member], idx, epoch)
        copies = self.privacy_plan.augmult if self.privacy_plan is not None else 1
        if copies == 1:
            images = augment(key, normalized(self.ds, self.ds.train_images[idx]), cfg, flip=flips)
        else:  # augmentation multiplicity: each example's copies side by side, example-major
            clean = normalized(self.ds, self.ds.train_images[idx])
            images = torch.stack([augment(random.fold_in(key, AUGMULT + copy), clean, cfg, flip=flips)
                                  for copy in range(copies)], dim=1).flatten(0, 1)
        if not cfg.mixing:
            return images, self.ds.train_labels[idx]
        return mix_batch(random.fold_in(key, MIX), images, self.ds.train_labels[idx],
                         num_classes=len(self.ds.classes), mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                         mix_prob=cfg.mix_prob, switch_prob=cfg.mix_switch_prob)

    def order(self, epoch: int, member: int = 0) -> torch.Tensor:
        """``member``'s permutation of the training images for ``epoch``."""
        return random.permutation(random.fold_in(self.order_roots[member], epoch), len(self.ds.train_images))

    def step_batch(self, order: torch.Tensor, epoch: int, epoch_step: int, step: int, member: int = 0):
        """``(images, labels, model key)`` of step ``step`` (0-based) for ``member``, cut from its epoch ``order``.

        Under ``[privacy]`` with Poisson sampling the batch is instead the step's Poisson sample padded to the
        plan's ``max_batch_size``, padded rows labelled :data:`fnclass.privacy.PADDING`; the examples a too-large
        sample could not hold are added to ``self.overflow``.
        """
        aug_key, model_key = random.split(random.fold_in(self.step_roots[member], step))
        if self.poisson:
            plan = self.privacy_plan
            sample_key = random.fold_in(aug_key if self.privacy_secret is None else privacy.mixed(
                self.privacy_secret.to(aug_key.device), aug_key), SAMPLE)
            idx, valid, overflow = privacy.poisson_sample(sample_key, len(self.ds.train_images), plan.sample_rate,
                                                          plan.max_batch_size)
            self.overflow, self.sampled = self.overflow + overflow, valid.sum()
            images, labels = self.batch(idx, epoch, aug_key, member)
            return images, torch.where(valid, labels, privacy.PADDING), model_key
        idx = order[epoch_step * self.batch_size:(epoch_step + 1) * self.batch_size]
        images, labels = self.batch(idx, epoch, aug_key, member)
        return images, labels, model_key

    def _run_step(self, train_state, orders, epoch: int, epoch_step: int, step: int):
        """The step ``step`` (0-based): every member's own batch and model key, then one (vmapped) call."""
        batches, keys = [], []
        for member, order in enumerate(orders):
            images, labels, model_key = self.step_batch(order, epoch, epoch_step, step, member)
            batches.append((images, labels))
            keys.append(model_key)
        if not self.members:
            # Every process cuts the same global batch (the same keys) and steps on its own shard of it.
            images, labels = (distributed.shard(self.process, part) for part in batches[0])
            return self.train_step(train_state, (images, labels), keys[0])
        batch = (torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]))
        return self.train_step(train_state, batch, torch.stack(keys), self.hyper)

    def compile(self, train_state: TrainState, dev) -> float:
        """Compile the step on a throwaway call (the step is pure: its result is dropped); the seconds it took.

        Every real step is then timed, as airbench's clock includes its first step.
        """
        tick = time.perf_counter()
        orders = [torch.arange(self.batch_size, device=dev)] * len(self.step_roots)
        self._run_step(train_state, orders, 0, 0, -1)  # no real step uses a negative step number
        synchronize(dev)
        return time.perf_counter() - tick

    def __call__(self, train_state: TrainState, epoch: int, dev,
                 progress: dict | None = None) -> tuple[TrainState, float, dict]:
        """The rest of ``epoch`` from ``train_state.step``: the new state, the seconds and the summed metrics.

        ``progress`` holds the sums of the epoch's steps run before a resume (from the checkpoint), so the
        epoch's train loss and accuracy add up as in an uninterrupted run. With members, the metrics' values
        are lists, one per member.
        """
        config = self.config
        progress = progress if progress and progress.get("epoch") == epoch else {}
        orders = [self.order(epoch, member) for member in range(len(self.order_roots))]
        shape = (len(orders),) if self.members else ()
        self.sums = {"loss_sum": torch.tensor(progress.get("loss_sum", 0.0), device=dev).expand(shape).clone(),
                     "correct": torch.tensor(progress.get("correct", 0), device=dev).expand(shape).clone(),
                     "skipped": torch.tensor(progress.get("skipped", 0), device=dev).expand(shape).clone(),
                     "images": int(progress.get("images", 0)), "epoch": epoch}
        if self.poisson:  # a Poisson batch's size varies: its real examples are counted
            self.sums["examples"] = torch.tensor(progress.get("examples", 0), device=dev)
            self.overflow = torch.tensor(progress.get("overflow", 0), device=dev)
        loss_sum, correct, skipped = self.sums["loss_sum"], self.sums["correct"], self.sums["skipped"]
        self.first_bad = torch.zeros(shape, dtype=torch.int64, device=dev)  # the first non-finite step (0: none)
        images, start = 0, time.perf_counter()
        step, self.latest = _step_of(train_state), train_state
        for epoch_step in range(step - epoch * self.steps_per_epoch, self.steps_per_epoch):
            train_state, metrics = self._run_step(train_state, orders, epoch, epoch_step, step)
            self.latest = train_state
            finite = metrics["finite"]
            # Flags kept on the device: nothing here waits for the step to finish.
            self.first_bad = torch.where((self.first_bad == 0) & ~finite, train_state.step, self.first_bad)
            applied = finite & ~metrics["overflow"] if "overflow" in metrics else finite  # fp16 skips overflows
            skipped += ~applied
            count = self.sampled if self.poisson else self.batch_size
            loss_sum += torch.where(applied, metrics["loss"], 0.0) * count
            if self.poisson:
                self.sums["examples"] += torch.where(applied, count, 0)
            correct += metrics["correct"]
            step, images = step + 1, images + self.batch_size
            self.sums["images"] += self.batch_size
            fault_point("step")
            log = config.train.log_every_steps and step % config.train.log_every_steps == 0
            if log:
                synchronize(dev)
                self.check_finite()
            lr = float(self.schedule(step - 1))
            info = {"step": step, "epoch": epoch, "epoch_step": epoch_step + 1,
                    "steps_per_epoch": self.steps_per_epoch, "lr": lr,
                    "images_per_second": images * len(orders) / max(time.perf_counter() - start, 1e-9)}
            if log:
                losses = metrics["loss"].reshape(-1).tolist()
                info["loss"] = sum(losses) / len(losses)
                counts = skipped.reshape(-1).tolist()
                for member, (loss, scale) in enumerate(zip(losses, self.lr_scales)):
                    row = {"kind": "step", "step": step, "epoch": epoch, "loss": loss if math.isfinite(loss) else None,
                           "lr": lr * scale}
                    if self.members:
                        row = {"kind": "step", "member": member, **{k: v for k, v in row.items() if k != "kind"}}
                    if config.train.nan_policy == "skip" or config.train.precision == "fp16":
                        row["skipped_steps"] = counts[member]  # this epoch's, so far
                    self.run_dir.log(row)
            if self.grad_stats is not None and step % config.train.grad_stats_every == 0:
                self.run_dir.log({"kind": "grad_stats", "step": step, "epoch": epoch, **self.grad_stats(train_state)})
            self.run_dir.step(info)
            if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
                self.check_finite()  # a state after a non-finite step is never saved
                self.run_dir.save(train_state, self.progress())
        synchronize(dev)  # steps run asynchronously: the epoch ends when the GPU is done
        seconds = time.perf_counter() - start
        self.images_seen += images * len(orders)
        self.check_finite()  # before evaluating and saving: the last good checkpoint stays
        epoch_images = self.sums["images"]
        losses, rights, skips = (t.reshape(-1).tolist() for t in (loss_sum, correct, skipped))
        # The loss of a skipped step is not finite: it is left out of the mean.
        means = [total / (epoch_images - skip * self.batch_size) if epoch_images > skip * self.batch_size
                 else float("nan") for total, skip in zip(losses, skips)]
        accuracies = [right / max(epoch_images, 1) for right in rights]
        extra = {}
        if self.poisson:  # the real examples the Poisson batches held (the skipped steps' left out of the mean)
            examples = int(self.sums["examples"])
            means = [total / examples if examples else float("nan") for total in losses]
            accuracies = [right / max(examples, 1) for right in rights]
            extra = {"poisson_overflow": int(self.overflow)}
        speed = images * len(orders) / seconds if seconds > 0 else None  # this process's images, all members
        if self.members:
            return train_state, seconds, {"loss": means, "accuracy": accuracies, "skipped_steps": skips,
                                          "images_per_second": speed}
        return train_state, seconds, {"loss": means[0], "accuracy": accuracies[0], "skipped_steps": skips[0],
                                      "images_per_second": speed, **extra}

    def progress(self) -> dict | None:
        """The epoch's sums so far as JSON numbers (saved with a mid-epoch checkpoint); None before any epoch."""
        if not self.sums:
            return None
        sums = {"loss_sum": self.sums["loss_sum"].tolist(), "correct": self.sums["correct"].tolist(),
                "skipped": self.sums["skipped"].tolist(), "images": self.sums["images"], "epoch": self.sums["epoch"]}
        if "examples" in self.sums:
            sums.update(examples=int(self.sums["examples"]), overflow=int(self.overflow))
        return sums

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if a step of this epoch had a non-finite loss or gradient (policy stop).

        Called where the loop synchronises anyway, so detection comes at most ``min(train.log_every_steps,
        checkpoint.every_steps, steps left in the epoch)`` steps late; the message names the exact step.
        """
        if self.config.train.nan_policy != "stop" or self.first_bad is None:
            return
        flags = self.first_bad.reshape(-1).tolist()
        bad = [(step, member) for member, step in enumerate(flags) if step]
        if bad:
            bad, member = min(bad)
            who = f" in member {member} ({self.member_names[member]})" if self.members and self.member_names else ""
            optim, last = self.config.optim, self.run_dir.last
            kept = f"{last} holds the last good state" if last.is_file() else "no checkpoint was written before it"
            raise TrainingDiverged(
                f"training diverged: the loss or a gradient is nan/inf at step {bad} (epoch "
                f"{(bad - 1) // self.steps_per_epoch + 1}){who}; likely causes: a learning rate too high (optim.lr = "
                f"{optim.lr}), no gradient clipping (optim.clip_norm = {optim.clip_norm}), bf16 overflow "
                f"(train.precision = {self.config.train.precision!r}) or bad input data; {kept}; lower optim.lr, "
                "or set train.nan_policy = \"skip\" to skip such updates",
                step=bad)


def run_facts(config: Config, *, clock: dict, images_seen: int, steps: int, start_step: int, dev, ds: RunData,
              run: RunDirectory, seed, num_params: int) -> dict:
    """The summary.json fields every training program writes: timings, steps, resume, device, versions, data."""
    from fnclass._version import __version__
    from fnclass.io import device_name

    return {
        "train_seconds": clock["train"], "compile_seconds": clock["compile"], "whitening_seconds": clock["whitening"],
        "final_eval_seconds": clock["final_eval"],
        "images_per_second": images_seen / clock["train"] if clock["train"] else None,
        "steps": steps, "epochs": config.train.epochs, "resumed_from_step": start_step or None,
        "resumed_from_checkpoint": run.resumed_from.name if run.resumed_from else None,
        "skipped_steps": sum(row.get("skipped_steps", 0) for row in run.epoch_rows()),
        "nan_policy": config.train.nan_policy, "init_from": config.train.init_from,
        "device": device_name(dev), "torch_version": torch.__version__, "fnclass_version": __version__,
        "seed": seed, "num_params": num_params, "model": config.model.name, "data_dir": str(ds.folder),
        "train_images": len(ds.train_images), "test_images": len(ds.test_images),
        "val_images": 0 if ds.val_images is None else len(ds.val_images), "run_dir": str(run.path),
    }


def _step_of(train_state: TrainState) -> int:
    """The step count of a TrainState (of its first member when stacked: members step together)."""
    return int(train_state.step.reshape(-1)[0])


class GradStats:
    """Noise scale and per-layer-group gradient norms of a fixed probe batch (BatchNorm in eval mode)."""

    def __init__(self, config: Config, ds: RunData, model):
        probe = slice(0, min(config.train.grad_stats_examples, len(ds.train_images)))
        self.images, self.labels = normalized(ds, ds.train_images[probe]), ds.train_labels[probe]
        self.model, self.chunk_size = model, config.train.eval_batch_size

    def __call__(self, train_state: TrainState) -> dict:
        from fnclass.analysis.gradients import (
            gradient_statistics,  # analysis is a program of its own; only this uses it
        )

        stats = gradient_statistics(self.model, train_state.params, train_state.state, self.images, self.labels,
                                    cosine=False, chunk_size=self.chunk_size)
        return {"noise_scale": stats["noise_scale"]["b_simple"],
                "grad_norm": float(stats["per_example"]["grad_norm"].mean()),
                "group_grad_norms": {g: float(n.mean()) for g, n in stats["per_example"]["group_norms"].items()}}
