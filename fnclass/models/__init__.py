"""Models as ``Model(init, apply, param_labels, data_init)``, built from a :class:`fnclass.config.ModelConfig`.

Each model is one module with ``DEFAULTS`` (the shape its config fields take when left out), ``build(config)``
and, if it has keys of its own to check, ``validate(config)``; adding a model is a new module and a line in
:data:`MODELS`.
"""

from __future__ import annotations

import dataclasses

from fnclass.config import Config, ConfigError, ModelConfig, shown
from fnclass.models import fast, resnet_attn, tiny
from fnclass.models.model import LABELS, Model

MODELS = {"resnet_attn": resnet_attn, "fast": fast, "tiny": tiny}
DEFAULT_NUM_CLASSES = 10  # a model built without data (``model.num_classes`` left out): CIFAR-10's


def resolve(config: ModelConfig) -> ModelConfig:
    """A copy of ``config`` with the named model's defaults filled in, checked against that model.

    Raises:
      ConfigError: for an unknown name or a shape the model cannot take (one line naming the key).
    """
    if config.name not in MODELS:
        raise ConfigError(f"model.name = {shown(config.name)} is not allowed: expected one of {', '.join(MODELS)}")
    module = MODELS[config.name]
    config = dataclasses.replace(config, **{k: v for k, v in module.DEFAULTS.items() if getattr(config, k) is None})
    if hasattr(module, "validate"):
        module.validate(config)
    _validate_shape(config)
    return config


def resolve_config(config: Config, source: str | None = None) -> Config:
    """A whole run config with its model section resolved (see :func:`resolve`); errors name ``source``."""
    try:
        return dataclasses.replace(config, model=resolve(config.model))
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}" if source else str(error)) from None


def build_model(config: ModelConfig, *, batch_norm_axis=None) -> Model:
    """Build the model that ``config.name`` names.

    Args:
      config: the model section of a run's config; defaults are filled in with :func:`resolve`.
      batch_norm_axis: a :class:`fnclass.distributed.Process` whose processes' shards BatchNorm takes its
        training statistics over (synchronised BatchNorm; Equinox's ``axis_name``), or None: this batch only.

    Returns:
      The model's ``Model(init, apply, param_labels, data_init)``.
    """
    config = resolve(config)
    if config.num_classes is None:  # a run fills it from the data folder's classes.txt before building
        config = dataclasses.replace(config, num_classes=DEFAULT_NUM_CLASSES)
    return MODELS[config.name].build(config, batch_norm_axis)


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {shown(value)} is not allowed: expected {allowed}")


def _validate_shape(cfg: ModelConfig) -> None:
    """The checks every model's shape must pass once its defaults are filled in."""
    _check(len(cfg.widths) >= 1 and all(1 <= w <= 65536 for w in cfg.widths), "model.widths", cfg.widths,
           "a non-empty list of integers in 1..65536")
    _check(1 <= cfg.stem_width <= 65536, "model.stem_width", cfg.stem_width, "an integer in 1..65536")
    _check(all(0 <= s < len(cfg.widths) for s in cfg.attn_after), "model.attn_after", cfg.attn_after,
           f"stage indices in 0..{len(cfg.widths) - 1}")
    _check(list(cfg.attn_after) == sorted(set(cfg.attn_after)), "model.attn_after", cfg.attn_after,
           "distinct stage indices in increasing order")
    _check(0 <= cfg.attn_layers <= 1000, "model.attn_layers", cfg.attn_layers, "an integer in 0..1000")
    if cfg.norm == "group":  # the channels of every norm layer: the stages' and, where there is one, the stem's
        channels = list(cfg.widths) + ([cfg.stem_width] if cfg.name != "resnet_attn" and not cfg.whiten else [])
        for width in channels:
            _check(width % min(cfg.norm_groups, width) == 0, "model.norm_groups", cfg.norm_groups,
                   f"a divisor of every norm layer's channels (model.widths, model.stem_width), {width} among them")
    for stage in cfg.attn_after:
        _check(cfg.attn_heads >= 1 and cfg.widths[stage] % cfg.attn_heads == 0, "model.attn_heads",
               cfg.attn_heads, f"a divisor of the attended stage's width {cfg.widths[stage]}")


__all__ = ["LABELS", "MODELS", "Model", "build_model", "resolve", "resolve_config"]
