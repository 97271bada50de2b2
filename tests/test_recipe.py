"""The recipe: models label their parameter groups, and the optimizer is assembled from those labels."""

import re

import optree
import pytest
import torch

import fnclass
from fnclass.config import ModelConfig, OptimConfig
from fnclass.core import tree
from fnclass.models import LABELS
from fnclass.training import recipe


def _expected_label(path: str, leaf) -> str:
    """The groups spelled out by path, as the training code once matched them (an independent reference)."""
    if path.startswith("head."):
        return "head_weights" if path.endswith("weight") else "head_biases"
    if path == "whiten.bias":
        return "whitening_bias"
    if re.search(r"(^|\.)bn\d*\.bias$", path):
        return "batch_norm_biases"
    if path.endswith(".scale"):
        return "norm_scales"
    return "weights" if leaf.ndim > 1 else "biases"


@pytest.mark.parametrize("cfg", [
    ModelConfig(name="resnet_attn", widths=(8, 16), depths=(2, 1), attn_after=(1,), attn_layers=2, attn_heads=2),
    ModelConfig(name="fast", widths=(8, 16, 16), whiten=True),
    ModelConfig(name="tiny", widths=(8, 16, 16), dropout=0.1),
], ids=["resnet_attn", "fast-whiten", "tiny"])
def test_every_parameter_has_the_label_of_its_group(cfg):
    model = fnclass.build_model(cfg)
    params, _ = model.init(fnclass.key(0))
    labels = model.param_labels(params)
    assert optree.tree_structure(labels) == optree.tree_structure(params)
    flat_labels, flat_params = tree.flatten_paths(labels), tree.flatten_paths(params)
    assert set(flat_labels.values()) <= set(LABELS)
    assert flat_labels == {path: _expected_label(path, leaf) for path, leaf in flat_params.items()}


def test_weight_decay_and_lr_scales_follow_the_labels():
    cfg = ModelConfig(name="tiny", widths=(8, 16, 16))
    model = fnclass.build_model(cfg)
    params, _ = model.init(fnclass.key(0))
    config = OptimConfig(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.1, bias_lr_scale=4.0, head_lr_scale=0.25,
                         schedule="constant")
    opt = recipe.create_optimizer(config, model.param_labels, steps_per_epoch=1, epochs=1)
    zeros = tree.tree_map(lambda p: p * 0, params)
    updates, _ = opt.update(zeros, opt.init(params), params)  # zero gradients: only the decay moves anything
    for path, update in tree.flatten_paths(updates).items():
        param = tree.flatten_paths(params)[path]
        decayed = param.ndim > 1  # filters, attention matrices and the head's weight
        scale = 0.25 if path.startswith("head.") else 4.0 if path.endswith("bn.bias") else 1.0
        expected = -0.5 * scale * 0.1 * param if decayed else param * 0
        # Three float32 products in another order: at most a few roundings of eps/2 each, relative to each element.
        torch.testing.assert_close(update, expected, rtol=4 * torch.finfo(torch.float32).eps, atol=0, msg=path)
