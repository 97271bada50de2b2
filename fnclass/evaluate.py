"""Evaluation: a trained model's metrics over a whole split, with airbench's test-time augmentation."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fnclass import data
from fnclass.io import fault_point
from fnclass.losses import per_example_cross_entropy


def tta_logits(eval_step: Callable, params, state, images: torch.Tensor, level: int,
               logits: torch.Tensor | None = None) -> torch.Tensor:
    """Logits averaged over test-time views of a normalised NCHW batch (airbench's test-time augmentation).

    Level 1 averages the image and its mirror; level 2 gives that pair half the weight and the pairs
    shifted by one pixel up-left and down-right (reflect padding) the other half. ``logits``, when given,
    are the plain view's (already computed), so that view is not run again.
    """
    def pair(views, plain=None):
        plain = eval_step(params, state, views) if plain is None else plain
        return 0.5 * (plain + eval_step(params, state, views.flip(3)))

    logits = pair(images, logits)
    if level >= 2:
        height, width = images.shape[2:]
        padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
        logits = 0.5 * logits + 0.25 * (pair(padded[:, :, :height, :width]) + pair(padded[:, :, 2:, 2:]))
    return logits


def evaluate_dataset(eval_step: Callable, params, state, images: torch.Tensor, labels: torch.Tensor, *,
                     mean, std, batch_size: int, tta: int = 0) -> dict:
    """Logits-based metrics over a whole uint8 split: loss, accuracy, per-class accuracy (and TTA accuracy).

    ``tta`` is the :func:`tta_logits` level (0: off; 1: flips; 2: flips and translations). Returns a dict
    of Python numbers plus ``predictions`` (an int64 tensor on the CPU).
    """
    loss_sum = torch.zeros((), device=images.device)
    predictions, tta_predictions = [], []
    for start in range(0, len(images), batch_size):
        fault_point("eval")
        x = data.normalize(images[start:start + batch_size], mean, std)
        y = labels[start:start + batch_size]
        logits = eval_step(params, state, x)
        loss_sum += per_example_cross_entropy(logits, y).sum()
        predictions.append(logits.argmax(dim=-1))
        if tta:
            tta_predictions.append(tta_logits(eval_step, params, state, x, tta, logits).argmax(dim=-1))
    predictions = torch.cat(predictions)
    correct = predictions == labels
    per_class = torch.zeros(int(labels.max()) + 1, device=labels.device).index_add_(0, labels, correct.float())
    counts = torch.bincount(labels, minlength=len(per_class)).clamp(min=1)
    result = {"loss": loss_sum.item() / len(labels), "accuracy": correct.float().mean().item(),
              "per_class_accuracy": (per_class / counts).tolist(), "predictions": predictions.cpu()}
    if tta:
        result["tta_accuracy"] = (torch.cat(tta_predictions) == labels).float().mean().item()
    return result
