"""Models as ``Model(init, apply)`` pairs, built from a :class:`fnclass.config.ModelConfig`."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from fnclass.config import ModelConfig


class Model(NamedTuple):
    """A model as two pure functions.

    ``init(key) -> (params, state)`` builds the parameter tree and the model state (BatchNorm running
    statistics) from a key. ``apply(params, state, images, *, train, key=None) -> (logits, new_state)``
    maps a float NCHW batch to logits; ``key`` drives dropout when training.
    """

    init: Callable
    apply: Callable


def build_model(config: ModelConfig) -> Model:
    """Build the model that ``config.name`` names (``resnet_attn``, ``fast`` or ``tiny``).

    Args:
      config: the model section of a run's config; ``config.resolved()`` fills per-model defaults.

    Returns:
      The model's ``Model(init, apply)``.
    """
    from fnclass.models import fast, resnet_attn

    config = config.resolved()
    builders = {"resnet_attn": resnet_attn.build, "fast": fast.build, "tiny": fast.build}
    return builders[config.name](config)


__all__ = ["Model", "build_model"]
