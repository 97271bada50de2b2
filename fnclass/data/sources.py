"""Batch sources: which training examples each step sees, and their keys.

A source is called as ``source(step, epoch, epoch_step) -> Batch`` (:class:`fnclass.data.batches.Batch`) and draws
everything from the run's key, so the same step always gets the same batch (a resumed run replays it). The
permuted source below walks a fresh permutation of the training split each epoch; the Poisson source of DP-SGD is
:class:`fnclass.privacy.sources.PoissonSource`; data parallelism wraps either in
:class:`fnclass.distributed.sources.Sharded`, and members stack theirs with :class:`Stacked`.

Keys: a member's key splits into an order root and a step root; epoch ``e``'s permutation comes from
``fold_in(order_root, e)``, alternating flips from ``fold_in(order_root, -1)``, and step ``t``'s augmentation and
model keys from ``split(fold_in(step_root, t))``.
"""

from __future__ import annotations

import torch

from fnclass.config import DataConfig
from fnclass.core import random
from fnclass.data.batches import Batch, RunData, augmented_batch, step_keys


def roots(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's (or member's) order root and step root."""
    order_root, step_root = random.split(key)
    return order_root, step_root


class PermutedSource:
    """Each epoch a permutation of the training split, cut into batches of ``batch_size`` (the last partial batch
    dropped: static shapes), augmented as ``config`` says (flips, alternating flips, crops, mixup/CutMix), each
    example ``copies`` times side by side (augmentation multiplicity)."""

    varying = False  # every batch holds batch_size real examples

    def __init__(self, ds: RunData, config: DataConfig, key: torch.Tensor, batch_size: int, *, copies: int = 1):
        self.ds, self.config, self.batch_size, self.copies = ds, config, batch_size, copies
        self.order_root, self.step_root = roots(key)
        # Alternating flips: which half of the data is mirrored in even epochs, drawn once for the run.
        self.first_flips = (random.bernoulli(random.fold_in(self.order_root, -1), 0.5, (len(ds.train_images),))
                            if config.alternate_flips else None)
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of the training images for ``epoch``."""
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, random.permutation(random.fold_in(self.order_root, epoch), len(self.ds.train_images))
        return self._order[1]

    def indices(self, epoch: int, epoch_step: int) -> torch.Tensor:
        """The training examples of ``epoch``'s batch ``epoch_step``: rows ``epoch_step * batch_size ...`` of the
        epoch's permutation."""
        return self.order(epoch)[epoch_step * self.batch_size:(epoch_step + 1) * self.batch_size]

    def __call__(self, step: int, epoch: int, epoch_step: int) -> Batch:
        """Step ``step``'s (0-based) batch: the examples :meth:`indices` names, augmented from the step's key."""
        aug_key, model_key = step_keys(self.step_root, step)
        idx = self.indices(epoch, epoch_step)
        images, labels = augmented_batch(self.ds, self.config, idx, epoch, aug_key, first_flips=self.first_flips,
                                         copies=self.copies)
        weights = None if self.ds.train_weights is None else self.ds.train_weights[idx]
        return Batch(images, labels, model_key, weights=weights)


class Stacked:
    """Members' sources side by side: every field of their batches stacked on a leading member axis."""

    def __init__(self, sources: list):
        self.sources, self.varying = sources, sources[0].varying

    def __call__(self, step: int, epoch: int, epoch_step: int) -> Batch:
        batches = [source(step, epoch, epoch_step) for source in self.sources]
        return Batch(*[None if field[0] is None else torch.stack(field) for field in zip(*batches)])
