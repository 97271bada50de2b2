"""Losses and metrics: pure functions of logits and integer labels or probability rows (mixed targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 for the loss (bf16 and fp16 ones are widened); float64 ones stay float64."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing) -> torch.Tensor:
    """Per-example cross-entropy against probability rows, smoothed towards the uniform distribution."""
    if targets.shape != logits.shape:
        raise ValueError(f"float targets must be probability rows of the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}; pass integer class indices as an integer tensor")
    log_probs = torch.log_softmax(_wide(logits), dim=-1)
    smoothed = (1.0 - label_smoothing) * targets.float() + label_smoothing / logits.shape[-1]
    return -(smoothed * log_probs).sum(dim=-1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean softmax cross-entropy, optionally with label smoothing (as ``torch.nn.CrossEntropyLoss``).

    Args:
      logits: (N, classes) unnormalised scores (any float dtype; computed in float32).
      targets: (N,) integer class indices, or (N, classes) float probability rows (mixup and cutmix targets,
        see :func:`fnclass.core.augment.mix_batch`).
      label_smoothing: the mass spread uniformly over all classes, in [0, 1); a 0-d tensor (one value per
        member of a vmapped sweep) is computed by the same formula written out. Probability rows become
        ``(1 - label_smoothing) * targets + label_smoothing / classes``, which is the same as smoothing each
        one-hot row before mixing them.

      weights: (N,) a weight per example (``data.train_weights``): the mean of ``weights * per-example loss``,
        still over all N examples (a weight of 0 removes an example's loss, not its row from the mean).

    Returns:
      A 0-d float32 tensor.
    """
    if weights is not None:
        return (_per_example(logits, targets, label_smoothing) * weights).mean()
    if targets.is_floating_point():
        return _soft_cross_entropy(logits, targets, label_smoothing).mean()
    if isinstance(label_smoothing, torch.Tensor):
        log_probs = torch.log_softmax(_wide(logits), dim=-1)
        nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
        return ((1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=-1)).mean()
    # The mean of the per-example losses (not F.cross_entropy's own reduction): the same float as the weighted loss
    # with all weights 1, and the same gradient, bit for bit.
    return F.cross_entropy(_wide(logits), targets, label_smoothing=label_smoothing, reduction="none").mean()


def _per_example(logits: torch.Tensor, targets: torch.Tensor, label_smoothing) -> torch.Tensor:
    """Each example's cross-entropy, for every kind of ``targets`` and ``label_smoothing`` :func:`cross_entropy`
    takes."""
    if isinstance(label_smoothing, torch.Tensor) and not targets.is_floating_point():
        log_probs = torch.log_softmax(_wide(logits), dim=-1)
        nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
        return (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=-1)
    return per_example_cross_entropy(logits, targets, label_smoothing=label_smoothing)


def per_example_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *,
                              label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of each example, shape (N,); ``targets`` as in :func:`cross_entropy`."""
    if targets.is_floating_point():
        return _soft_cross_entropy(logits, targets, label_smoothing)
    return F.cross_entropy(_wide(logits), targets, label_smoothing=label_smoothing, reduction="none")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose highest logit is the label, as a 0-d float32 tensor."""
    return (logits.argmax(dim=-1) == labels).float().mean()


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRAK's output function for classification: ``logit_y - logsumexp_{j != y} logit_j`` per example."""
    logits = _wide(logits)
    correct = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return correct - torch.logsumexp(others, 1)
