"""Stateful torch.nn twins of fnclass's models: the reference the functional code is checked against.

Module attribute names mirror the pytree paths, so a flat fnclass path maps to a state_dict key by
renaming only the leaf names (BatchNorm ``scale`` -> ``weight``, ``mean`` -> ``running_mean``,
attention ``qkv`` -> ``mha.in_proj_*``, ``proj`` -> ``mha.out_proj``). Used by tests and benchmarks, and
as the independent implementation that runs an exported safetensors file in a Python where fnclass cannot
be imported: the module classes need only torch and a resolved model config (any object with its fields).
"""

from __future__ import annotations

import re

import torch
from torch import nn

DEFAULT_NUM_CLASSES = 10  # fnclass.models' default for a model built without data; this file imports no fnclass

_RENAMES = [
    (r"\.qkv\.weight$", ".mha.in_proj_weight"),
    (r"\.qkv\.bias$", ".mha.in_proj_bias"),
    (r"\.proj\.", ".mha.out_proj."),
    (r"\.scale$", ".weight"),
    (r"\.mean$", ".running_mean"),
    (r"\.var$", ".running_var"),
]


def torch_name(path: str) -> str:
    """The state_dict key of the nn.Module twin for an fnclass flat path."""
    for pattern, replacement in _RENAMES:
        path = re.sub(pattern, replacement, path)
    return path


_NORM = {"norm": "batch", "groups": 16, "standardize": False}  # set by build_module from the config being built


def Norm(channels):  # noqa: N802 - a layer factory, named like the layers it returns
    """BatchNorm2d, or GroupNorm(min(groups, channels)) for ``model.norm = "group"`` (the attribute stays ``bn``)."""
    if _NORM["norm"] == "group":
        return nn.GroupNorm(min(_NORM["groups"], channels), channels)
    return nn.BatchNorm2d(channels)


class WSConv2d(nn.Conv2d):
    """A convolution of weight-standardised filters (per output filter: zero mean, unit variance, eps 1e-5)."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) * torch.rsqrt(var + 1e-5), self.bias)


def Conv2d(*args, **kwargs):  # noqa: N802
    """nn.Conv2d, or WSConv2d with ``model.weight_standardization``."""
    return (WSConv2d if _NORM["standardize"] else nn.Conv2d)(*args, **kwargs)


class ConvBN(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=None):
        super().__init__()
        self.conv = Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, bias=False)
        self.bn = Norm(cout)


class SpatialAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        u = self.norm(t)
        t = t + self.mha(u, u, u, need_weights=False)[0]
        return t.transpose(1, 2).reshape(n, c, h, w)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = Norm(cout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = Norm(cout)
        self.shortcut = ConvBN(cin, cout, 1, stride, 0) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        s = self.shortcut.bn(self.shortcut.conv(x)) if self.shortcut is not None else x
        return torch.relu(y + s)


class Stage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class ResNetAttn(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.stem = ConvBN(3, cfg.widths[0], 3)
        stages, cin = [], cfg.widths[0]
        for i, (w, d) in enumerate(zip(cfg.widths, cfg.depths)):
            stages.append(Stage([BasicBlock(cin if j == 0 else w, w, 2 if i > 0 and j == 0 else 1) for j in range(d)]))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.sites = [s for s in cfg.attn_after for _ in range(cfg.attn_layers)]
        self.attn = nn.ModuleList([SpatialAttention(cfg.widths[s], cfg.attn_heads) for s in self.sites])
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes or DEFAULT_NUM_CLASSES)

    def forward(self, x):
        x = torch.relu(self.stem.bn(self.stem.conv(x)))
        for i, stage in enumerate(self.stages):
            for block in stage.blocks:
                x = block(x)
            for j, site in enumerate(self.sites):
                if site == i:
                    x = self.attn[j](x)
        return self.head(x.mean(dim=(2, 3)))


class FastBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3)
        self.conv2 = ConvBN(cout, cout, 3)

    def forward(self, x):
        x = nn.functional.gelu(self.conv1.bn(nn.functional.max_pool2d(self.conv1.conv(x), 2)))
        return x + nn.functional.gelu(self.conv2.bn(self.conv2.conv(x)))


class Fast(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if getattr(cfg, "whiten", False):  # the patch-whitening stem: fixed filters (a buffer), a trained bias
            channels = 2 * 3 * cfg.whiten_kernel ** 2
            self.whiten = nn.Conv2d(3, channels, cfg.whiten_kernel, padding=0)
            del self.whiten.weight
            self.whiten.register_buffer("weight", torch.zeros(channels, 3, cfg.whiten_kernel, cfg.whiten_kernel))
            cin = channels
        else:
            self.stem = ConvBN(3, cfg.stem_width, 3)
            cin = cfg.stem_width
        blocks = []
        for w in cfg.widths:
            blocks.append(FastBlock(cin, w))
            cin = w
        self.blocks = nn.ModuleList(blocks)
        self.sites = [s for s in cfg.attn_after for _ in range(cfg.attn_layers)]
        self.attn = nn.ModuleList([SpatialAttention(cfg.widths[s], cfg.attn_heads) for s in self.sites])
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes or DEFAULT_NUM_CLASSES, bias=False)

    def forward(self, x):
        if hasattr(self, "whiten"):
            x = nn.functional.gelu(self.whiten(x))
        else:
            x = nn.functional.gelu(self.stem.bn(self.stem.conv(x)))
        for i, block in enumerate(self.blocks):
            x = block(x)
            for j, site in enumerate(self.sites):
                if site == i:
                    x = self.attn[j](x)
        return self.head(x.amax(dim=(2, 3)))


def build_module(cfg) -> nn.Module:
    """The nn.Module twin (fresh weights) of a resolved model config."""
    _NORM.update(norm=getattr(cfg, "norm", "batch"), groups=getattr(cfg, "norm_groups", 16),
                 standardize=getattr(cfg, "weight_standardization", False))
    return ResNetAttn(cfg) if cfg.name == "resnet_attn" else Fast(cfg)


def load_flat(module: nn.Module, flat: dict[str, torch.Tensor]) -> nn.Module:
    """Copy flat fnclass paths (``stem.conv.weight``, ``stem.bn.mean``, ...) into the module's state_dict."""
    flat = {torch_name(k): v for k, v in flat.items()}
    own = module.state_dict()
    expected = {k for k in own if not k.endswith("num_batches_tracked")}
    assert expected == set(flat), (sorted(expected - set(flat))[:5], sorted(set(flat) - expected)[:5])
    module.load_state_dict({**own, **{k: v.clone() for k, v in flat.items()}})
    return module


def reference_module(cfg, params, state) -> nn.Module:
    """The nn.Module twin of ``cfg``'s model, holding copies of ``params`` and ``state``."""
    from fnclass.core import tree
    from fnclass.models import resolve

    return load_flat(build_module(resolve(cfg)), {**tree.flatten_paths(params), **tree.flatten_paths(state)})


def module_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameter gradients keyed by state_dict name."""
    return {name: p.grad for name, p in module.named_parameters()}
