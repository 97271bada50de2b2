"""Pieces the models share: the normalisation layer (BatchNorm or GroupNorm), the self-attention refinement, the
classifier head, conv + norm labels.

A model's normalisation layers keep the names ``bn``, ``bn1``, ... whichever ``model.norm`` says, so parameter
paths, per-layer reports and optimizer groups line up between the two; under GroupNorm their state is empty.
"""

from __future__ import annotations

from fnclass.config import ModelConfig
from fnclass.core import layers, random
from fnclass.models.model import BATCH_NORM_BIASES, BIASES, HEAD_BIASES, HEAD_WEIGHTS, NORM_SCALES, WEIGHTS


def norm_init(config: ModelConfig, channels: int) -> tuple[dict, dict]:
    """``(params, state)`` of the normalisation layer ``model.norm`` names, over ``channels``."""
    if config.norm == "group":
        return layers.group_norm_init(channels), {}
    return layers.batch_norm_init(channels)


def norm(params: dict, state: dict, x, config: ModelConfig, *, train: bool, axis=None):
    """BatchNorm (running statistics in ``state``) or GroupNorm (none); returns ``(y, new_state)``."""
    if config.norm == "group":
        return layers.group_norm(params, x, groups=norm_groups(config, x.shape[1])), state
    return layers.batch_norm(params, state, x, train=train, momentum=config.bn_momentum, axis=axis)


def norm_groups(config: ModelConfig, channels: int) -> int:
    """GroupNorm's groups at a layer of ``channels``: ``min(model.norm_groups, channels)``."""
    return min(config.norm_groups, channels)


def conv(params: dict, x, config: ModelConfig, **kwargs):
    """A convolution, of weight-standardised filters when ``model.weight_standardization``."""
    return layers.conv(params, x, standardize=config.weight_standardization, **kwargs)


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


def conv_labels(params: dict) -> dict:
    """Labels of a convolution's (or dense layer's) ``weight`` and optional ``bias``."""
    return {name: WEIGHTS if name == "weight" else BIASES for name in params}


def batch_norm_labels() -> dict:
    """Labels of a BatchNorm's ``scale`` and ``bias``."""
    return {"scale": NORM_SCALES, "bias": BATCH_NORM_BIASES}


def conv_bn_labels(params: dict) -> dict:
    """Labels of a ``{"conv", "bn"}`` pair."""
    return {"conv": conv_labels(params["conv"]), "bn": batch_norm_labels()}


def attention_labels(attn_params: list[dict]) -> list[dict]:
    """Labels of the self-attention blocks: LayerNorm scale and bias, projection matrices and biases."""
    return [{"norm": {"scale": NORM_SCALES, "bias": BIASES}, "qkv": conv_labels(p["qkv"]),
             "proj": conv_labels(p["proj"])} for p in attn_params]


def head_labels(params: dict) -> dict:
    """Labels of the classifier head."""
    return {name: HEAD_WEIGHTS if name == "weight" else HEAD_BIASES for name in params}
