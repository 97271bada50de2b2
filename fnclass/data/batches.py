"""The run's data on its device and the batches cut from it: the split images as one uint8 tensor, normalisation,
and one batch's augmentation (crops, flips, alternating flips, mixup/CutMix, augmentation multiplicity) from its key.

Batch sources (:mod:`fnclass.data.sources`, :mod:`fnclass.privacy.sources`) choose which examples a step sees;
what is done to them is :func:`augmented_batch`, the same for every source.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fnclass import data
from fnclass.config import Config, ConfigError, DataConfig
from fnclass.core import random
from fnclass.core.augment import alternating_flips, augment, mix_batch

MIX = 0x313  # folded into a step's augmentation key for mixup/CutMix, so crops and flips keep their keys
PUBLIC_NORMALIZATION = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # pixel values in [0, 1] to about [-2, 2]
AUGMULT = 0xA06  # folded into a step's augmentation key with each augmented copy's index ([privacy] augmult > 1)


class Batch(NamedTuple):
    """One step's batch from a source: normalised, augmented NCHW ``images``, ``labels`` (int64, or soft targets
    after mixing; -1 marks a padded row), the model's ``key`` (dropout), and for a source whose batches vary in size,
    ``examples`` (the real rows, a device tensor) and ``overflow`` (sampled examples a fixed-size batch could not
    hold); None for fixed-size batches. ``weights``: each row's loss weight, when the run has them."""

    images: torch.Tensor
    labels: torch.Tensor
    key: torch.Tensor
    examples: torch.Tensor | None = None
    overflow: torch.Tensor | None = None
    weights: torch.Tensor | None = None  # the examples' loss weights (data.train_weights); None: all 1

    @property
    def step_batch(self) -> tuple:
        """What a train step takes: ``(images, labels)``, or ``(images, labels, weights)`` with loss weights."""
        return (self.images, self.labels) if self.weights is None else (self.images, self.labels, self.weights)


def step_keys(step_root: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s augmentation key and model key: ``split(fold_in(step_root, step))``."""
    aug_key, model_key = random.split(random.fold_in(step_root, step))
    return aug_key, model_key


def augmented_batch(ds: RunData, config: DataConfig, idx: torch.Tensor, epoch: int, key: torch.Tensor, *,
                    first_flips: torch.Tensor | None = None, copies: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented, normalised batch of the training examples ``idx``, from the step's augmentation ``key``.

    ``first_flips`` (alternating flips: which examples are mirrored in even epochs) decides the flips instead of the
    key. With ``copies`` > 1 (augmentation multiplicity) each example's copies stand side by side, example-major,
    each from ``fold_in(key, AUGMULT + copy)``. With mixup or CutMix the labels are soft targets, ``(B, classes)``
    float rows, mixed from ``fold_in(key, MIX)`` (the other augmentations' keys are unchanged).
    """
    flips = None if first_flips is None else alternating_flips(first_flips, idx, epoch)
    if copies == 1:
        images = augment(key, normalized(ds, ds.train_images[idx]), config, flip=flips)
    else:
        clean = normalized(ds, ds.train_images[idx])
        images = torch.stack([augment(random.fold_in(key, AUGMULT + copy), clean, config, flip=flips)
                              for copy in range(copies)], dim=1).flatten(0, 1)
    if not config.mixing:
        return images, ds.train_labels[idx]
    return mix_batch(random.fold_in(key, MIX), images, ds.train_labels[idx], num_classes=len(ds.classes),
                     mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, mix_prob=config.mix_prob,
                     switch_prob=config.mix_switch_prob)


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
    train_weights: torch.Tensor | None = None  # data.train_weights of the training rows, float32; None: all 1
    train_rows: torch.Tensor | None = None  # the row of train_images.npy of each training image (CPU int64)

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
    rows = _train_rows(config.data, folder)
    val_images = val_labels = None
    if config.data.val_size:
        train_idx, val_idx = data.validation_split(dataset.train_labels, config.data.val_size, config.data.val_seed)
        val_images, val_labels = dataset.train_images[val_idx].to(dev), dataset.train_labels[val_idx].to(dev)
        dataset = dataset._replace(train_images=dataset.train_images[train_idx],
                                   train_labels=dataset.train_labels[train_idx])
        rows = rows[train_idx]
    weights = None
    if config.data.train_weights is not None:
        weights = data.read_weights(config.data.train_weights, _split_size(folder))[rows].to(dev)
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
                           val_images, val_labels, weights, rows)


def _split_size(folder: Path) -> int:
    """The number of rows of the data folder's train_images.npy (from its labels' header)."""
    return len(np.load(folder / "train_labels.npy", mmap_mode="r", allow_pickle=False))


def _train_rows(config: DataConfig, folder: Path) -> torch.Tensor:
    """The rows of train_images.npy that ``data.train_limit`` or ``data.train_indices`` selects, in order."""
    size = _split_size(folder)
    if config.train_indices is not None:
        return data.read_indices(config.train_indices, size)
    return torch.arange(min(config.train_limit or size, size))


def normalized(ds: RunData, images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images -> normalised float NCHW."""
    return data.normalize(images, ds.mean_t, ds.std_t)
