"""Losses and metrics: pure functions of logits and integer labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean softmax cross-entropy, optionally with label smoothing (as ``torch.nn.CrossEntropyLoss``).

    Args:
      logits: (N, classes) unnormalised scores (any float dtype; computed in float32).
      labels: (N,) integer class indices.
      label_smoothing: the mass spread uniformly over all classes, in [0, 1); a 0-d tensor (one value per
        member of a vmapped sweep) is computed by the same formula written out.

    Returns:
      A 0-d float32 tensor.
    """
    if isinstance(label_smoothing, torch.Tensor):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        nll = -log_probs.gather(-1, labels[..., None]).squeeze(-1)
        return ((1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=-1)).mean()
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def per_example_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *,
                              label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of each example, shape (N,)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction="none")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose highest logit is the label, as a 0-d float32 tensor."""
    return (logits.argmax(dim=-1) == labels).float().mean()
