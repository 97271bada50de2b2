"""The ``Model`` type every model builds, and the labels of its parameter groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

# Parameter-group labels. The optimizer is assembled from them (decay, Muon, lr multipliers, freezing), so
# training code never looks at parameter paths.
WEIGHTS = "weights"  # convolution filters and attention matrices
BIASES = "biases"  # biases of convolutions, attention projections and LayerNorm
NORM_SCALES = "norm_scales"  # BatchNorm and LayerNorm scales
BATCH_NORM_BIASES = "batch_norm_biases"
WHITENING_BIAS = "whitening_bias"  # the bias of fast's frozen patch-whitening stem
HEAD_WEIGHTS = "head_weights"
HEAD_BIASES = "head_biases"
LABELS = (WEIGHTS, BIASES, NORM_SCALES, BATCH_NORM_BIASES, WHITENING_BIAS, HEAD_WEIGHTS, HEAD_BIASES)


class Model(NamedTuple):
    """A model as pure functions.

    ``init(key) -> (params, state)`` builds the parameter tree and the model state (BatchNorm running
    statistics) from a key. ``apply(params, state, images, *, train, key=None) -> (logits, new_state)``
    maps a float NCHW batch to logits; ``key`` drives dropout when training. ``param_labels(params)`` is a
    tree shaped like ``params`` holding one of :data:`LABELS` per leaf. ``data_init(state, images, normalize) ->
    state``, when not None, is initialisation the model needs from the training images before training starts:
    ``images`` is the whole uint8 NHWC training split, ``normalize`` turns a slice of it into the normalised NCHW
    input ``apply`` takes, so the model normalises only the images it uses.
    """

    init: Callable
    apply: Callable
    param_labels: Callable | None = None  # every registered model has them; the optimizer is built from them
    data_init: Callable | None = None
