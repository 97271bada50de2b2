"""Datasets in the canonical on-disk format: a folder of ``.npy`` arrays plus ``classes.txt``.

``train_images.npy`` (N, H, W, 3) uint8 RGB, ``train_labels.npy`` (N,) integers, the same for ``test_*``,
and ``classes.txt`` with one class name a line in label order. Arrays are loaded without pickle and
validated, then kept as uint8 tensors; batches are cut and normalised on the device.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy", "classes.txt")


class DataError(ValueError):
    """The data folder is missing or malformed; the message names the file and the fix."""


class Dataset(NamedTuple):
    """A labelled image classification dataset held as tensors (images uint8 NHWC, labels int64)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]


def _load_array(path: Path) -> np.ndarray:
    """``np.load`` without pickle, turning every failure into a one-line DataError."""
    if not path.is_file():
        raise DataError(f"{path} is missing: a data folder needs {', '.join(FILES)} "
                        "(write one with `fnclass data prepare`)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(
            f"{path} is not a readable .npy array ({error}); re-create it with `fnclass data prepare`"
        ) from None


def _check_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    """Validate one split's shapes, dtypes and label range."""
    where = folder / f"{split}_images.npy"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{where}: expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{folder / f'{split}_labels.npy'}: expected a 1-d integer array, "
                        f"got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{folder / f'{split}_labels.npy'}: labels must lie in 0..{num_classes - 1} "
                        f"(classes.txt has {num_classes} lines), found {labels.min()}..{labels.max()}")


def load_classes(folder: Path) -> tuple[str, ...]:
    """The class names from ``classes.txt``, one a line."""
    path = Path(folder) / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path} is missing: write one class name a line, in label order")
    classes = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(classes) < 2:
        raise DataError(f"{path}: expected at least 2 class names, found {len(classes)}")
    return classes


def load_split(folder: str | Path, split: str, *, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load and validate one split (``"train"`` or ``"test"``) as ``(images uint8 NHWC, labels int64)``.

    Args:
      folder: the data folder.
      split: ``"train"`` or ``"test"``.
      limit: keep only the first ``limit`` examples (the canonical files are in shuffled order).

    Returns:
      CPU tensors ``(images, labels)``.

    Raises:
      DataError: when a file is missing, unreadable or malformed.
    """
    folder = Path(folder)
    classes = load_classes(folder)
    images = _load_array(folder / f"{split}_images.npy")
    labels = _load_array(folder / f"{split}_labels.npy")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    _check_split(folder, split, images, labels, len(classes))
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def load_dataset(folder: str | Path, *, train_limit: int | None = None, test_limit: int | None = None) -> Dataset:
    """Load a whole data folder (see :func:`load_split`)."""
    train_images, train_labels = load_split(folder, "train", limit=train_limit)
    test_images, test_labels = load_split(folder, "test", limit=test_limit)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"{folder}: train images are {tuple(train_images.shape[1:])} but test images are "
                        f"{tuple(test_images.shape[1:])}")
    return Dataset(train_images, train_labels, test_images, test_labels, load_classes(Path(folder)))


def channel_stats(images: torch.Tensor, chunk: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 NHWC images, scaled to [0, 1]."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 1, 2))
        squares += (x * x).sum(dim=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = (squares / count - mean * mean).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC images -> normalised float NCHW: ``(x / 255 - mean) / std`` per channel."""
    mean_t = torch.as_tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    x = images.permute(0, 3, 1, 2).to(dtype) * (1.0 / 255.0)
    return (x - mean_t) / std_t
