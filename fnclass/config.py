"""Typed, frozen run configuration read from TOML and validated once, at the edge.

A run's config has the sections ``[model]``, ``[data]``, ``[optim]``, ``[train]`` and ``[checkpoint]``,
one frozen dataclass each. :func:`load_config` reads a TOML file, applies ``--set key=value``
overrides and raises :class:`ConfigError` (one line naming the file, the key and what is allowed) on
an unknown key, a wrong type or an impossible value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message names the key and the fix."""


MODEL_NAMES = ("resnet_attn", "fast", "tiny")

# Per-model defaults for the ModelConfig fields left as None: the paper's ResNet-18 widths with two
# attention layers on the 4x4 map; airbench94's widths (64/256/256) for `fast`; half-size for `tiny`.
_MODEL_DEFAULTS = {
    "resnet_attn": dict(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), attn_after=(3,), attn_layers=2,
                        attn_heads=8, stem_width=64),
    "fast": dict(widths=(64, 256, 256), depths=(1, 1, 1), attn_after=(2,), attn_layers=1, attn_heads=4,
                 stem_width=32),
    "tiny": dict(widths=(32, 64, 128), depths=(1, 1, 1), attn_after=(2,), attn_layers=1, attn_heads=2,
                 stem_width=16),
}


@dataclass(frozen=True)
class ModelConfig:
    """Which network, and its shape. Fields left ``None`` take the named model's defaults."""

    name: str = "resnet_attn"
    num_classes: int = 10
    widths: tuple[int, ...] | None = None  # channels per stage
    depths: tuple[int, ...] | None = None  # residual blocks per stage (resnet_attn only)
    stem_width: int | None = None  # channels of the first convolution (fast/tiny)
    attn_after: tuple[int, ...] | None = None  # stage indices followed by self-attention
    attn_layers: int | None = None  # attention blocks at each of those stages
    attn_heads: int | None = None
    attn_impl: str = "sdpa"  # "sdpa" (fused kernels) or "math" (faster under vmap)
    bn_momentum: float = 0.1  # torch.nn.BatchNorm2d's default
    dropout: float = 0.0  # before the classifier

    def resolved(self) -> ModelConfig:
        """A copy with every ``None`` replaced by the named model's default."""
        defaults = _MODEL_DEFAULTS[self.name]
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values."""
        _check(self.name in MODEL_NAMES, "model.name", self.name, f"one of {', '.join(MODEL_NAMES)}")
        cfg = self.resolved()
        _check(cfg.num_classes >= 2, "model.num_classes", cfg.num_classes, "an integer >= 2")
        _check(len(cfg.widths) >= 1 and all(w >= 1 for w in cfg.widths), "model.widths", cfg.widths,
               "a non-empty list of positive integers")
        if cfg.name == "resnet_attn":
            _check(len(cfg.depths) == len(cfg.widths) and all(d >= 1 for d in cfg.depths), "model.depths",
                   cfg.depths, f"{len(cfg.widths)} positive integers, one per entry of model.widths")
        _check(all(0 <= s < len(cfg.widths) for s in cfg.attn_after), "model.attn_after", cfg.attn_after,
               f"stage indices in 0..{len(cfg.widths) - 1}")
        _check(list(cfg.attn_after) == sorted(set(cfg.attn_after)), "model.attn_after", cfg.attn_after,
               "distinct stage indices in increasing order")
        _check(cfg.attn_layers >= 0, "model.attn_layers", cfg.attn_layers, "an integer >= 0")
        for stage in cfg.attn_after:
            _check(cfg.attn_heads >= 1 and cfg.widths[stage] % cfg.attn_heads == 0, "model.attn_heads",
                   cfg.attn_heads, f"a divisor of the attended stage's width {cfg.widths[stage]}")
        _check(cfg.attn_impl in ("sdpa", "math"), "model.attn_impl", cfg.attn_impl, '"sdpa" or "math"')
        _check(0.0 <= cfg.bn_momentum <= 1.0, "model.bn_momentum", cfg.bn_momentum, "a number in [0, 1]")
        _check(0.0 <= cfg.dropout < 1.0, "model.dropout", cfg.dropout, "a number in [0, 1)")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed: expected {allowed}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` (from TOML) against a dataclass field's type; lists become tuples."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected a list")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_coerce(item, item_type, key) for item in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and (type(value) is not annotation):
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        raise ConfigError(f"{key} = {value!r} is not allowed: expected {names[annotation]}")
    return value


def section_from_dict(cls: type, data: dict, section: str) -> Any:
    """Build a config dataclass from a TOML table, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]}: allowed keys are {', '.join(sorted(fields))}")
    values = {name: _coerce(value, hints[name], f"{section}.{name}") for name, value in data.items()}
    return cls(**values)


