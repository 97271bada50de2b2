"""Per-example gradients: ``torch.func.vmap`` over ``torch.func.grad_and_value`` of a batch loss applied to one
example at a time. The one function :mod:`fnclass.analysis.gradients` and DP-SGD (:mod:`fnclass.privacy`) share."""

from __future__ import annotations

from collections.abc import Callable

import torch


def per_example_grad_and_value(loss_and_aux: Callable, *, copies: int = 1) -> Callable:
    """``fn(params, images, labels, *mapped) -> (grads, (losses, aux))``, every output with a leading example axis.

    Args:
      loss_and_aux: ``loss_and_aux(params, images, labels, *mapped) -> (0-d loss, aux)``, a batch's loss; here
        each call sees one example: its ``copies`` images ``(copies, C, H, W)`` and its label repeated ``copies``
        times, with that example's slice of every ``mapped`` argument (e.g. its random key).
      copies: images per example (augmentation multiplicity): ``images`` holds ``len(labels) * copies`` images,
        example-major, and an example's gradient is that of its loss over its copies.

    Returns:
      The function; gradients have the shape ``(N, *param.shape)``.
    """
    def one_example(params, images, label, *mapped):
        return loss_and_aux(params, images, label.expand(copies, *label.shape), *mapped)

    grad_and_value = torch.func.grad_and_value(one_example, has_aux=True)

    def per_example(params, images, labels, *mapped):
        images = images.reshape(len(labels), copies, *images.shape[1:])
        in_dims = (None, 0, 0) + (0,) * len(mapped)
        return torch.func.vmap(grad_and_value, in_dims=in_dims)(params, images, labels, *mapped)
    return per_example
