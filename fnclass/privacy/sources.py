"""DP-SGD's batch source: each step a Poisson sample of the training split (every example in with probability
``q``, drawn from the run's secret key), padded to a static size, with augmentation multiplicity.

Padded rows carry the label :data:`fnclass.privacy.PADDING` and contribute exactly nothing to the clipped sum
(:func:`fnclass.privacy.clipped_noisy_gradient`). The samples' keys mix the run's secret into the step's public
augmentation key, so the seed a checkpoint records does not reveal which examples a step used.
"""

from __future__ import annotations

import torch

from fnclass.config import DataConfig
from fnclass.core import random
from fnclass.data.batches import Batch, RunData, augmented_batch, step_keys
from fnclass.data.sources import PermutedSource
from fnclass.privacy import PADDING, Plan, mixed, poisson_sample

SAMPLE = 0x5A3  # folded into a step's (secret-mixed) augmentation key for its Poisson sample


class PoissonSource(PermutedSource):
    """Step ``t``'s batch: the Poisson sample of ``fold_in(mixed(secret, aug_key), SAMPLE)`` at the plan's rate,
    padded to ``plan.max_batch_size``, each example augmented ``plan.augmult`` times. ``Batch.examples`` counts the
    real rows; ``Batch.overflow`` the sampled examples a too-large sample could not hold (never silently dropped).
    With ``shards`` (data-parallel processes), more padding rows follow so that the batch divides among them; the
    real rows and their augmentation stay those of one process."""

    varying = True

    def __init__(self, ds: RunData, config: DataConfig, key: torch.Tensor, plan: Plan, secret: torch.Tensor | None,
                 *, shards: int = 1):
        super().__init__(ds, config, key, plan.max_batch_size, copies=plan.augmult)
        self.plan, self.secret, self.extra = plan, secret, -plan.max_batch_size % shards

    def __call__(self, step: int, epoch: int, epoch_step: int) -> Batch:
        aug_key, model_key = step_keys(self.step_root, step)
        secret_key = aug_key if self.secret is None else mixed(self.secret.to(aug_key.device), aug_key)
        idx, valid, overflow = poisson_sample(random.fold_in(secret_key, SAMPLE), len(self.ds.train_images),
                                              self.plan.sample_rate, self.plan.max_batch_size)
        images, labels = augmented_batch(self.ds, self.config, idx, epoch, aug_key, first_flips=self.first_flips,
                                         copies=self.copies)
        labels = torch.where(valid, labels, PADDING)
        if self.extra:  # padding rows (a zero image each: what the clipped gradient gives a padded row anyway)
            images = torch.cat([images, images.new_zeros((self.extra * self.copies, *images.shape[1:]))])
            labels = torch.cat([labels, labels.new_full((self.extra,), PADDING)])
        return Batch(images, labels, model_key, valid.sum(), overflow)
