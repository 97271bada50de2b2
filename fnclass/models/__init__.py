"""Models as ``Model(init, apply)`` pairs, built from a :class:`fnclass.config.ModelConfig`."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from fnclass import layers, random
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


def attention_init(key, config: ModelConfig) -> list[dict]:
    """Parameters of every self-attention block: ``attn_layers`` after each stage in ``attn_after``."""
    sites = _attention_sites(config)
    keys = random.split(key, max(len(sites), 1))
    return [layers.spatial_attention_init(keys[j], config.widths[stage]) for j, stage in enumerate(sites)]


def refine(attn_params: list[dict], x, stage: int, config: ModelConfig):
    """Apply the self-attention blocks placed after ``stage`` to the feature map ``x``."""
    for j, site in enumerate(_attention_sites(config)):
        if site == stage:
            x = layers.spatial_attention(attn_params[j], x, heads=config.attn_heads, impl=config.attn_impl)
    return x


def classify(head_params: dict, features, config: ModelConfig, *, train: bool, key=None):
    """The classifier head: dropout (when training and configured) then a linear layer."""
    if config.dropout > 0.0 and train:
        features = layers.dropout(key, features, config.dropout, train=train)
    return layers.linear(head_params, features)


def _attention_sites(config: ModelConfig) -> list[int]:
    """The stage after which each attention block sits, in order."""
    return [stage for stage in config.attn_after for _ in range(config.attn_layers)]


__all__ = ["Model", "attention_init", "build_model", "classify", "refine"]
