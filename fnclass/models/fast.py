"""A compact residual net with one attention layer, shaped like the fastest CIFAR-10 trainers (airbench).

A 3x3 stem, then one block per entry of ``widths``: ``conv -> max-pool 2 -> BN -> GELU`` followed by a
residual ``conv -> BN -> GELU``, so the resolution goes 32 -> 16 -> 8 -> 4. Self-attention refines the
4x4 map after the stages in ``attn_after``; the head is a global max-pool and a bias-free linear layer.
``fast`` (widths 64/256/256, stem 32) has about 2.2M parameters; ``tiny`` (32/64/128, stem 16) is the
same shape sized for a CPU.

With ``whiten`` the stem is airbench's patch-whitening layer instead: a ``k`` x ``k`` convolution without
padding whose filters (model *state*, never trained) are fitted to the training images by
:func:`fit_whitening`, plus a trained bias and a GELU. ``dirac_init`` starts every 3x3 convolution of the
blocks as an identity on its first input-channel filters.
"""

from __future__ import annotations

import torch

from fnclass.config import ModelConfig
from fnclass.core import layers, random
from fnclass.models.blocks import (
    attention_init,
    attention_labels,
    classify,
    conv,
    conv_bn_labels,
    head_labels,
    norm,
    norm_init,
    refine,
)
from fnclass.models.model import WHITENING_BIAS, Model

# airbench94's widths with one attention layer on the 4x4 map.
DEFAULTS = dict(widths=(64, 256, 256), depths=(1, 1, 1), attn_after=(2,), attn_layers=1, attn_heads=4, stem_width=32)
WHITENING_EXAMPLES = 5000  # airbench fits its whitening layer to the first 5,000 training images, unaugmented



def _conv_bn_init(key, in_channels, out_channels, config, *, dirac=False):
    """A bias-free 3x3 convolution and its norm: ``(params, state)``."""
    bn_params, bn_state = norm_init(config, out_channels)
    conv = layers.conv_init(key, in_channels, out_channels, 3)
    if dirac:
        conv["weight"] = layers.dirac(conv["weight"])
    return {"conv": conv, "bn": bn_params}, {"bn": bn_state}


def _conv_bn(params, state, x, *, pool, train, config, axis=None):
    """``gelu(bn(pool(conv(x))))``; returns ``(y, new_state)``."""
    x = conv(params["conv"], x, config)
    if pool:
        x = layers.max_pool(x)
    x, bn = norm(params["bn"], state["bn"], x, config, train=train, axis=axis)
    return layers.gelu(x), {"bn": bn}


def build(config: ModelConfig, batch_norm_axis=None):
    """``Model(init, apply)`` for a resolved ``fast`` or ``tiny`` config."""
    widths = config.widths

    def init(key):
        k_stem, k_blocks, k_attn, k_head = random.split(key, 4)
        params, state = {}, {}
        if config.whiten:
            channels = 2 * 3 * config.whiten_kernel ** 2
            params["whiten"] = {"bias": torch.zeros(channels)}
            state["whiten"] = {"weight": torch.zeros(channels, 3, config.whiten_kernel, config.whiten_kernel)}
            in_channels = channels
        else:
            params["stem"], state["stem"] = _conv_bn_init(k_stem, 3, config.stem_width, config)
            in_channels = config.stem_width
        params["blocks"], state["blocks"] = [], []
        for i, width in enumerate(widths):
            k1, k2 = random.split(random.fold_in(k_blocks, i))
            p1, s1 = _conv_bn_init(k1, in_channels, width, config, dirac=config.dirac_init)
            p2, s2 = _conv_bn_init(k2, width, width, config, dirac=config.dirac_init)
            params["blocks"].append({"conv1": p1, "conv2": p2})
            state["blocks"].append({"conv1": s1, "conv2": s2})
            in_channels = width
        params["attn"] = attention_init(k_attn, config)
        params["head"] = layers.linear_init(k_head, widths[-1], config.num_classes, bias=False)
        return params, state

    def apply(params, state, images, *, train, key=None):
        if config.whiten:
            whiten = {"weight": state["whiten"]["weight"], "bias": params["whiten"]["bias"]}
            x, new_state = layers.gelu(layers.conv(whiten, images, padding=0)), {"whiten": state["whiten"]}
        else:
            x, stem = _conv_bn(params["stem"], state["stem"], images, pool=False, train=train, config=config,
                                 axis=batch_norm_axis)
            new_state = {"stem": stem}
        new_state["blocks"] = []
        for i, (block_params, block_state) in enumerate(zip(params["blocks"], state["blocks"])):
            x, s1 = _conv_bn(block_params["conv1"], block_state["conv1"], x, pool=True, train=train, config=config,
                             axis=batch_norm_axis)
            y, s2 = _conv_bn(block_params["conv2"], block_state["conv2"], x, pool=False, train=train, config=config,
                             axis=batch_norm_axis)
            x = x + y
            new_state["blocks"].append({"conv1": s1, "conv2": s2})
            x = refine(params["attn"], x, i, config)
        logits = classify(params["head"], layers.global_max_pool(x), config, train=train, key=key)
        return logits, new_state

    def param_labels(params):
        labels = {"blocks": [{name: conv_bn_labels(p) for name, p in block.items()} for block in params["blocks"]],
                  "attn": attention_labels(params["attn"]), "head": head_labels(params["head"])}
        if config.whiten:
            labels["whiten"] = {"bias": WHITENING_BIAS}
        else:
            labels["stem"] = conv_bn_labels(params["stem"])
        return labels

    def data_init(state, images, normalize):
        return fit_whitening(state, normalize(images[:WHITENING_EXAMPLES]), config)

    return Model(init, apply, param_labels, data_init if config.whiten else None)


def fit_whitening(state: dict, images: torch.Tensor, config: ModelConfig) -> dict:
    """A copy of ``state`` whose whitening filters are fitted to ``images`` (normalised NCHW training images)."""
    filters = layers.whitening_filters(images, config.whiten_kernel).to(state["whiten"]["weight"].device)
    return {**state, "whiten": {"weight": filters}}
