"""Batched data augmentation on the device, per example, driven by an explicit key.

All functions take a normalised float NCHW batch and return a new one; each example gets its own
random translation, flip and cutout from ``key``, so the same key reproduces the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fnclass import random
from fnclass.config import DataConfig


def random_crop(key, images: torch.Tensor, padding: int, *, mode: str = "reflect") -> torch.Tensor:
    """Pad by ``padding`` pixels and cut a random window of the original size from each example.

    Args:
      key: the key.
      images: (N, C, H, W) float batch.
      padding: the largest shift in pixels.
      mode: ``"reflect"`` or ``"zeros"`` (zero is the dataset mean once normalised).

    Returns:
      The translated batch, same shape.
    """
    if padding == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect" if mode == "reflect" else "constant")
    shifts = random.randint(key.to(images.device), (2, n), 0, 2 * padding + 1)
    rows = shifts[0][:, None] + torch.arange(h, device=images.device)
    cols = shifts[1][:, None] + torch.arange(w, device=images.device)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing puts the gathered (N, H, W) axes first and channels last.
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_flip(key, images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror each example left-right with probability 1/2 (or where the bool (N,) ``flip`` says)."""
    if flip is None:
        flip = random.bernoulli(key.to(images.device), 0.5, (images.shape[0],))
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def alternating_flips(first: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which of the images ``indices`` to mirror in ``epoch``: derandomised flips (airbench).

    ``first`` (bool, one entry per image of the dataset, e.g. ``random.bernoulli(key, 0.5, (n,))`` drawn once)
    says which half is mirrored in even epochs; the other half is mirrored in odd ones, so every image is
    seen both ways in every pair of epochs.
    """
    return first[indices] ^ bool(epoch % 2)


def cutout(key, images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square at a random centre of each example (DeVries & Taylor, 2017)."""
    if size == 0:
        return images
    n, _, h, w = images.shape
    centres = random.randint(key.to(images.device), (2, n), 0, max(h, w))
    top = (centres[0] - size // 2)[:, None]
    left = (centres[1] - size // 2)[:, None]
    rows = torch.arange(h, device=images.device)[None, :]
    cols = torch.arange(w, device=images.device)[None, :]
    inside = ((rows >= top) & (rows < top + size))[:, :, None] & ((cols >= left) & (cols < left + size))[:, None, :]
    return images * (~inside)[:, None, :, :].to(images.dtype)


def augment(key, images: torch.Tensor, config: DataConfig, *, flip: torch.Tensor | None = None) -> torch.Tensor:
    """The training augmentation a :class:`DataConfig` asks for: crop, then flip, then cutout.

    ``flip`` (bool (N,)) replaces the random flips, e.g. with :func:`alternating_flips`.
    """
    k_crop, k_flip, k_cut = random.split(key, 3)
    images = random_crop(k_crop, images, config.crop_padding, mode=config.pad_mode)
    if config.flip:
        images = random_flip(k_flip, images, flip)
    return cutout(k_cut, images, config.cutout)
