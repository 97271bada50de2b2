"""The paper's model: a CIFAR ResNet (basic blocks) whose low-resolution maps are refined by self-attention.

The stem is a 3x3 convolution (no max-pool, as is usual for 32x32 inputs); stage ``i`` has
``depths[i]`` basic blocks of width ``widths[i]``, the first of each stage after the first halving the
resolution. After every stage listed in ``attn_after`` come ``attn_layers`` pre-norm self-attention
blocks over the spatial positions. The head is global average pooling, dropout and a linear layer.
"""

from __future__ import annotations

from fnclass.config import ConfigError, ModelConfig, shown
from fnclass.core import layers, random
from fnclass.models.blocks import (
    attention_init,
    attention_labels,
    batch_norm_labels,
    classify,
    conv,
    conv_bn_labels,
    conv_labels,
    head_labels,
    norm,
    norm_init,
    refine,
)
from fnclass.models.model import Model

# The paper's ResNet-18 widths and depths, with two attention layers on the 4x4 map.
DEFAULTS = dict(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), attn_after=(3,), attn_layers=2, attn_heads=8,
                stem_width=64)


def validate(config: ModelConfig) -> None:
    """Checks of this model's own keys."""
    # At most 1000 blocks a stage (ResNet-1001 has 111): a typo of 10**9 must not build for ever.
    if len(config.depths) != len(config.widths) or not all(1 <= d <= 1000 for d in config.depths):
        raise ConfigError(f"model.depths = {shown(config.depths)} is not allowed: expected {len(config.widths)} "
                          "integers in 1..1000, one per entry of model.widths")
    if config.whiten:
        raise ConfigError("model.whiten = True is not allowed: expected false for resnet_attn (the whitening stem "
                          "belongs to fast and tiny)")


def _conv_bn_init(key, in_channels, out_channels, kernel_size, config):
    """A bias-free convolution followed by its norm: ``({"conv", "bn"}, {"bn"})``."""
    bn_params, bn_state = norm_init(config, out_channels)
    return {"conv": layers.conv_init(key, in_channels, out_channels, kernel_size), "bn": bn_params}, {"bn": bn_state}


def _block_init(key, in_channels, out_channels, stride, config):
    """A basic residual block; a 1x1 projection shortcut when the shape changes."""
    k1, k2, k3 = random.split(key, 3)
    params = {"conv1": layers.conv_init(k1, in_channels, out_channels, 3),
              "conv2": layers.conv_init(k2, out_channels, out_channels, 3)}
    params["bn1"], bn1_state = norm_init(config, out_channels)
    params["bn2"], bn2_state = norm_init(config, out_channels)
    state = {"bn1": bn1_state, "bn2": bn2_state}
    if stride != 1 or in_channels != out_channels:
        params["shortcut"], state["shortcut"] = _conv_bn_init(k3, in_channels, out_channels, 1, config)
    return params, state


def _block(params, state, x, *, stride, train, config, axis=None):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; returns ``(y, new_state)``."""
    y = conv(params["conv1"], x, config, stride=stride, padding=1)
    y, bn1 = norm(params["bn1"], state["bn1"], y, config, train=train, axis=axis)
    y = conv(params["conv2"], layers.relu(y), config)
    y, bn2 = norm(params["bn2"], state["bn2"], y, config, train=train, axis=axis)
    new_state = {"bn1": bn1, "bn2": bn2}
    shortcut = x
    if "shortcut" in params:
        shortcut = conv(params["shortcut"]["conv"], x, config, stride=stride, padding=0)
        shortcut, bn = norm(params["shortcut"]["bn"], state["shortcut"]["bn"], shortcut, config, train=train,
                             axis=axis)
        new_state["shortcut"] = {"bn": bn}
    return layers.relu(y + shortcut), new_state


def build(config: ModelConfig, batch_norm_axis=None):
    """``Model(init, apply)`` for a resolved ``resnet_attn`` config."""
    widths, depths = config.widths, config.depths

    def init(key):
        k_stem, k_stages, k_attn, k_head = random.split(key, 4)
        params, state = {}, {}
        params["stem"], state["stem"] = _conv_bn_init(k_stem, 3, widths[0], 3, config)
        params["stages"], state["stages"] = [], []
        in_channels = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            keys = random.split(random.fold_in(k_stages, i), depth)
            blocks = [_block_init(keys[j], in_channels if j == 0 else width, width,
                                  2 if (i > 0 and j == 0) else 1, config) for j in range(depth)]
            params["stages"].append({"blocks": [p for p, _ in blocks]})
            state["stages"].append({"blocks": [s for _, s in blocks]})
            in_channels = width
        params["attn"] = attention_init(k_attn, config)
        params["head"] = layers.linear_init(k_head, widths[-1], config.num_classes)
        return params, state

    def apply(params, state, images, *, train, key=None):
        x = conv(params["stem"]["conv"], images, config)
        x, stem_bn = norm(params["stem"]["bn"], state["stem"]["bn"], x, config, train=train,
                          axis=batch_norm_axis)
        x = layers.relu(x)
        new_state = {"stem": {"bn": stem_bn}, "stages": []}
        for i, (stage_params, stage_state) in enumerate(zip(params["stages"], state["stages"])):
            block_states = []
            for j, (block_params, block_state) in enumerate(zip(stage_params["blocks"], stage_state["blocks"])):
                stride = 2 if (i > 0 and j == 0) else 1
                x, block_state = _block(block_params, block_state, x, stride=stride, train=train, config=config,
                                        axis=batch_norm_axis)
                block_states.append(block_state)
            new_state["stages"].append({"blocks": block_states})
            x = refine(params["attn"], x, i, config)
        logits = classify(params["head"], layers.global_avg_pool(x), config, train=train, key=key)
        return logits, new_state

    def param_labels(params):
        return {"stem": conv_bn_labels(params["stem"]),
                "stages": [{"blocks": [_block_labels(b) for b in stage["blocks"]]} for stage in params["stages"]],
                "attn": attention_labels(params["attn"]), "head": head_labels(params["head"])}

    return Model(init, apply, param_labels)


def _block_labels(params: dict) -> dict:
    """Labels of a basic block's parameters."""
    labels = {"conv1": conv_labels(params["conv1"]), "conv2": conv_labels(params["conv2"]),
              "bn1": batch_norm_labels(), "bn2": batch_norm_labels()}
    if "shortcut" in params:
        labels["shortcut"] = conv_bn_labels(params["shortcut"])
    return labels
