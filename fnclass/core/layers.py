"""Layers as pure functions: an ``*_init`` that builds parameters from a key, and an apply function.

Initialisers follow torch.nn's defaults (weights and biases uniform in +-1/sqrt(fan_in)) so a model
behaves like its torch.nn twin from the first step. Apply functions never mutate their inputs:
:func:`batch_norm` in training mode returns the new running statistics as a new state dict.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F

from fnclass.core import random


def _fan_in_uniform(key, shape, fan_in):
    """Uniform in +-1/sqrt(fan_in): torch.nn's default for Conv2d and Linear weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)
    return random.uniform(key, shape, low=-bound, high=bound)


def conv_init(key, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = False) -> dict:
    """Parameters of a 2-d convolution: ``weight`` (out, in, k, k) and optionally ``bias`` (out,)."""
    k_weight, k_bias = random.split(key)
    fan_in = in_channels * kernel_size * kernel_size
    params = {"weight": _fan_in_uniform(k_weight, (out_channels, in_channels, kernel_size, kernel_size), fan_in)}
    if bias:
        params["bias"] = _fan_in_uniform(k_bias, (out_channels,), fan_in)
    return params


def conv(params: dict, x: torch.Tensor, *, stride: int = 1, padding: int | str = "same",
         standardize: bool = False) -> torch.Tensor:
    """2-d convolution of an NCHW batch (``padding="same"`` keeps the spatial size at stride 1); with
    ``standardize``, of the filters after :func:`standardize_weight`."""
    weight = standardize_weight(params["weight"]) if standardize else params["weight"]
    if padding == "same":
        padding = weight.shape[-1] // 2
    return F.conv2d(x, weight, params.get("bias"), stride=stride, padding=padding)


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each output filter with zero mean and unit variance over its inputs and taps: weight standardisation
    (Qiao et al. 2019), which lets GroupNorm networks train as well as BatchNorm ones (Brock et al. 2021)."""
    axes = tuple(range(1, weight.ndim))
    mean = weight.mean(dim=axes, keepdim=True)
    var = weight.var(dim=axes, keepdim=True, unbiased=False)
    return (weight - mean) * torch.rsqrt(var + eps)


def dirac(weight: torch.Tensor) -> torch.Tensor:
    """A copy of conv filters whose first ``min(out, in)`` filters pass their input channel through unchanged.

    airbench starts its convolutions this way so a deep stack begins close to the identity.
    """
    out_channels, in_channels, kh, kw = weight.shape
    n = min(out_channels, in_channels)
    identity = torch.zeros(n, in_channels, kh, kw, dtype=weight.dtype, device=weight.device)
    identity[torch.arange(n), torch.arange(n), kh // 2, kw // 2] = 1.0
    return torch.cat([identity, weight[n:]])


def whitening_filters(images: torch.Tensor, kernel_size: int = 2, eps: float = 5e-4) -> torch.Tensor:
    """Conv filters that whiten the ``kernel_size`` x ``kernel_size`` patches of an NCHW batch, and their negatives.

    The filters are the eigenvectors of the patches' (uncentred, the data being normalised) covariance,
    divided by ``sqrt(eigenvalue + eps)``, largest eigenvalue first: applied without padding, the first
    half of the output channels has (nearly) identity covariance over these images. The negated copy
    lets a following GELU keep both signs (airbench's patch-whitening layer).

    Returns:
      float32 filters of shape (2 * C * k * k, C, k, k).
    """
    channels = images.shape[1]
    patches = F.unfold(images.double(), kernel_size).transpose(1, 2).reshape(-1, channels * kernel_size ** 2)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    filters = (eigenvectors / torch.sqrt(eigenvalues + eps)).T.flip(0)
    filters = filters.reshape(-1, channels, kernel_size, kernel_size).float()
    return torch.cat([filters, -filters])


def linear_init(key, in_features: int, out_features: int, *, bias: bool = True) -> dict:
    """Parameters of a dense layer: ``weight`` (out, in) and optionally ``bias`` (out,)."""
    k_weight, k_bias = random.split(key)
    params = {"weight": _fan_in_uniform(k_weight, (out_features, in_features), in_features)}
    if bias:
        params["bias"] = _fan_in_uniform(k_bias, (out_features,), in_features)
    return params


def linear(params: dict, x: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias`` over the last axis."""
    return F.linear(x, params["weight"], params.get("bias"))


def batch_norm_init(channels: int) -> tuple[dict, dict]:
    """BatchNorm ``(params, state)``: ``scale``/``bias`` are learned, ``mean``/``var`` are running statistics."""
    params = {"scale": torch.ones(channels), "bias": torch.zeros(channels)}
    state = {"mean": torch.zeros(channels), "var": torch.ones(channels)}
    return params, state


_DIFFERENTIABLE_STATISTICS = contextvars.ContextVar("differentiable_statistics", default=False)


@contextlib.contextmanager
def differentiable_statistics():
    """Within it, :func:`batch_norm` computes its running statistics (and normalises with them in eval mode) with
    plain tensor operations, so reverse mode goes through them (``F.batch_norm`` updates them in place, outside
    autograd). The output in training mode, and so every parameter update, is the same; the statistics may differ
    in the last bit. Used to differentiate a whole training run (:mod:`fnclass.training.metagrad`)."""
    token = _DIFFERENTIABLE_STATISTICS.set(True)
    try:
        yield
    finally:
        _DIFFERENTIABLE_STATISTICS.reset(token)


def _differentiable_batch_norm(params, state, x, *, train, momentum, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if not train:
        scale = params["scale"] * torch.rsqrt(state["var"] + eps)
        return (x - state["mean"].view(shape)) * scale.view(shape) + params["bias"].view(shape), state
    dims = [0] + list(range(2, x.ndim))
    var, mean = torch.var_mean(x, dim=dims, correction=1)
    y = F.batch_norm(x, None, None, params["scale"], params["bias"], True, 0.0, eps)
    return y, {"mean": (1 - momentum) * state["mean"] + momentum * mean,
               "var": (1 - momentum) * state["var"] + momentum * var}


def batch_norm(params: dict, state: dict, x: torch.Tensor, *, train: bool, momentum: float = 0.1,
               eps: float = 1e-5, axis=None) -> tuple[torch.Tensor, dict]:
    """Batch normalisation over all axes but the channel axis 1; returns ``(y, new_state)``.

    In training mode the batch statistics normalise ``x`` and the running statistics move towards them
    (``new = (1 - momentum) * old + momentum * batch``, unbiased variance, as torch.nn.BatchNorm2d); the
    input ``state`` is left untouched. In eval mode the running statistics normalise and the state is
    returned as it came. With ``axis`` (a :class:`fnclass.distributed.Process`, named where the model is built, as
    Equinox's ``BatchNorm(axis_name=...)``) the batch is the global one, across the job's processes.
    """
    if _DIFFERENTIABLE_STATISTICS.get():
        return _differentiable_batch_norm(params, state, x, train=train, momentum=momentum, eps=eps)
    if not train:
        # bf16 autocast hands a bf16 x to float32 statistics; under vmap (per-example gradients) the mixed kernel
        # is not there, so normalise in float32 and round back, as the mixed kernel does.
        y = F.batch_norm(x.to(state["mean"].dtype), state["mean"], state["var"], params["scale"], params["bias"],
                         False, 0.0, eps).to(x.dtype)
        return y, state
    if axis is not None:
        return _global_batch_norm(params, state, x, axis, momentum, eps)
    # F.batch_norm updates running statistics in place; it gets copies, which become the new state.
    mean, var = state["mean"].clone(), state["var"].clone()
    y = F.batch_norm(x, mean, var, params["scale"], params["bias"], True, momentum, eps)
    return y, {"mean": mean, "var": var}


def _global_batch_norm(params: dict, state: dict, x: torch.Tensor, process, momentum: float, eps: float):
    """:func:`batch_norm` in training mode with statistics over all processes' shards: two all-reduces (the sum,
    then the sum of squared deviations; ``process.all_sum``), differentiable, so every gradient is the single
    process's."""
    axes = [axis for axis in range(x.ndim) if axis != 1]
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    count = x.numel() // x.shape[1] * process.world_size
    mean = process.all_sum(x.sum(axes)) / count
    centred = x - mean.view(shape)
    var = process.all_sum((centred * centred).sum(axes)) / count  # biased: what normalises, as F.batch_norm
    y = centred * torch.rsqrt(var + eps).view(shape) * params["scale"].view(shape) + params["bias"].view(shape)
    unbiased = var.detach() * count / max(count - 1, 1)
    return y, {"mean": torch.lerp(state["mean"], mean.detach(), momentum),
               "var": torch.lerp(state["var"], unbiased, momentum)}


def group_norm_init(channels: int) -> dict:
    """GroupNorm parameters ``scale`` and ``bias`` (per channel; GroupNorm keeps no running statistics)."""
    return {"scale": torch.ones(channels), "bias": torch.zeros(channels)}


def group_norm(params: dict, x: torch.Tensor, *, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """Group normalisation of an NCHW batch: statistics over each example's ``groups`` channel groups, so an
    example's output depends on that example alone (as ``torch.nn.GroupNorm``)."""
    return F.group_norm(x, groups, params["scale"], params["bias"], eps)


def layer_norm_init(features: int) -> dict:
    """LayerNorm parameters ``scale`` and ``bias`` over the last axis."""
    return {"scale": torch.ones(features), "bias": torch.zeros(features)}


def layer_norm(params: dict, x: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    """Layer normalisation over the last axis."""
    dtype = params["scale"].dtype
    return F.layer_norm(x.to(dtype), params["scale"].shape, params["scale"], params["bias"], eps).to(x.dtype)


def attention_init(key, dim: int) -> dict:
    """Multi-head attention parameters: a fused ``qkv`` projection (3*dim, dim) and an output ``proj``.

    The layout matches torch.nn.MultiheadAttention: ``qkv.weight`` is its ``in_proj_weight`` (rows q, k,
    v) and ``proj`` its ``out_proj``.
    """
    k_qkv, k_proj = random.split(key)
    qkv = {"weight": _xavier_uniform(k_qkv, (3 * dim, dim), fan_in=dim, fan_out=dim),
           "bias": torch.zeros(3 * dim)}
    proj = {"weight": _fan_in_uniform(k_proj, (dim, dim), dim), "bias": torch.zeros(dim)}
    return {"qkv": qkv, "proj": proj}


def _xavier_uniform(key, shape, *, fan_in, fan_out):
    """Glorot uniform, as torch.nn.MultiheadAttention initialises its input projection."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return random.uniform(key, shape, low=-bound, high=bound)


def attention(params: dict, tokens: torch.Tensor, *, heads: int, impl: str = "sdpa") -> torch.Tensor:
    """Multi-head self-attention over a (N, L, C) sequence; returns (N, L, C).

    ``impl="sdpa"`` uses ``F.scaled_dot_product_attention`` (fused kernels); ``impl="math"`` spells out
    ``softmax(q k^T / sqrt(d)) v``, which vectorises better under ``torch.func.vmap``.
    """
    n, length, dim = tokens.shape
    qkv = linear(params["qkv"], tokens).reshape(n, length, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        weights = torch.softmax(q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5), dim=-1)
        out = weights @ v
    return linear(params["proj"], out.transpose(1, 2).reshape(n, length, dim))


def spatial_attention_init(key, channels: int) -> dict:
    """A pre-norm residual self-attention block over the positions of a feature map."""
    return {"norm": layer_norm_init(channels), **attention_init(key, channels)}


def spatial_attention(params: dict, x: torch.Tensor, *, heads: int, impl: str = "sdpa") -> torch.Tensor:
    """Refine an NCHW feature map: every position attends to every other, ``x + attn(norm(x))``."""
    n, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    tokens = tokens + attention(params, layer_norm(params["norm"], tokens), heads=heads, impl=impl)
    return tokens.transpose(1, 2).reshape(n, c, h, w)


def dropout(key, x: torch.Tensor, rate: float, *, train: bool) -> torch.Tensor:
    """Zero each element with probability ``rate`` (scaling the rest by 1/(1-rate)) when training."""
    if not train or rate == 0.0:
        return x
    keep = random.uniform(key.to(x.device), x.shape) >= rate
    return torch.where(keep, x / (1.0 - rate), torch.zeros((), dtype=x.dtype, device=x.device))


def max_pool(x: torch.Tensor, size: int = 2) -> torch.Tensor:
    """Non-overlapping max pooling of an NCHW batch."""
    return F.max_pool2d(x, size)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial axes: (N, C, H, W) -> (N, C)."""
    return x.mean(dim=(2, 3))


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """Max over the spatial axes: (N, C, H, W) -> (N, C)."""
    return x.amax(dim=(2, 3))


relu = F.relu
gelu = F.gelu
