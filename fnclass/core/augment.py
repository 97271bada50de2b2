"""Batched data augmentation on the device, per example, driven by an explicit key.

All functions take a normalised float NCHW batch and return a new one; each example gets its own
random translation, flip and cutout from ``key``, so the same key reproduces the same batch.
:func:`mix_batch` mixes examples with each other (mixup, CutMix) and returns soft targets with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fnclass.config import DataConfig
from fnclass.core import random


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


def _cutmix_box(key, lam: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix's box as an (H, W) bool mask, and ``lam`` corrected to the part of the image outside it."""
    ratio = torch.sqrt(1.0 - lam)
    half_h, half_w = (h * ratio).floor().long() // 2, (w * ratio).floor().long() // 2
    k_row, k_col = random.split(key)
    centre_row, centre_col = random.randint(k_row, (), 0, h), random.randint(k_col, (), 0, w)
    # As timm: the box spans centre +- cut // 2, clipped to the image.
    top, bottom = (centre_row - half_h).clamp(0, h), (centre_row + half_h).clamp(0, h)
    left, right = (centre_col - half_w).clamp(0, w), (centre_col + half_w).clamp(0, w)
    rows = torch.arange(h, device=lam.device)[:, None]
    cols = torch.arange(w, device=lam.device)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return inside, (1.0 - (bottom - top) * (right - left) / (h * w)).to(torch.float32)


def mix_batch(key, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0, mix_prob: float = 1.0,
              switch_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019) of a batch with itself reversed: timm's batch mode.

    As timm's ``Mixup(mode="batch")``: one ``lam ~ Beta(alpha, alpha)`` is drawn for the batch, and example
    ``i`` is mixed with example ``N - 1 - i``. Mixup blends the images, ``lam * x + (1 - lam) * x.flip(0)``;
    CutMix pastes a box of side ratio ``sqrt(1 - lam)`` (spanning ``centre +- int(H * sqrt(1 - lam)) // 2``)
    at a uniformly random centre, clipped to the image, from the flipped batch, and ``lam`` becomes the
    fraction of the image outside the box. The targets are ``lam * onehot(y) + (1 - lam) * onehot(y.flip(0))``,
    unsmoothed (the loss smooths). Every choice is made with tensor ops on the images' device, so the host
    never waits for it.

    Args:
      key: the key.
      images: (N, C, H, W) float batch; not modified.
      labels: (N,) integer class indices.
      num_classes: the number of classes (the targets' width).
      mixup_alpha: Beta parameter for mixup; 0 turns mixup off.
      cutmix_alpha: Beta parameter for CutMix; 0 turns CutMix off. With both off the images come back
        unchanged with one-hot targets.
      mix_prob: the probability that the batch is mixed at all (otherwise ``lam`` = 1).
      switch_prob: the probability of CutMix rather than mixup when both are on.

    Returns:
      ``(images, targets)``: the mixed batch (same shape and dtype) and (N, num_classes) float32 rows summing to 1.
    """
    # A comparison rather than F.one_hot, which checks the labels' range by reading them on the host.
    targets = (labels[:, None] == torch.arange(num_classes, device=labels.device)).to(torch.float32)
    if mixup_alpha <= 0.0 and cutmix_alpha <= 0.0:
        return images, targets
    k_apply, k_switch, k_mixup, k_cutmix, k_box = random.split(key.to(images.device), 5)
    partners = images.flip(0)
    if mixup_alpha > 0.0:
        lam_mixup = random.beta(k_mixup, mixup_alpha, mixup_alpha, ())
        mixup = lam_mixup * images + (1.0 - lam_mixup) * partners
    if cutmix_alpha > 0.0:
        # Drawn in float64 so that the box side int(H * sqrt(1 - lam)) rounds as timm's NumPy arithmetic does.
        lam_cutmix = random.beta(k_cutmix, cutmix_alpha, cutmix_alpha, (), dtype=torch.float64)
        inside, lam_cutmix = _cutmix_box(k_box, lam_cutmix, *images.shape[2:])
        cutmix = torch.where(inside, partners, images)
    if mixup_alpha <= 0.0:
        mixed, lam = cutmix, lam_cutmix
    elif cutmix_alpha <= 0.0:
        mixed, lam = mixup, lam_mixup
    else:
        use_cutmix = random.bernoulli(k_switch, switch_prob, ())
        mixed, lam = torch.where(use_cutmix, cutmix, mixup), torch.where(use_cutmix, lam_cutmix, lam_mixup)
    apply = random.bernoulli(k_apply, mix_prob, ())
    lam = torch.where(apply, lam, 1.0)
    return torch.where(apply, mixed, images), lam * targets + (1.0 - lam) * targets.flip(0)


def augment(key, images: torch.Tensor, config: DataConfig, *, flip: torch.Tensor | None = None) -> torch.Tensor:
    """The training augmentation a :class:`DataConfig` asks for: crop, then flip, then cutout.

    ``flip`` (bool (N,)) replaces the random flips, e.g. with :func:`alternating_flips`.
    """
    k_crop, k_flip, k_cut = random.split(key, 3)
    images = random_crop(k_crop, images, config.crop_padding, mode=config.pad_mode)
    if config.flip:
        images = random_flip(k_flip, images, flip)
    return cutout(k_cut, images, config.cutout)
