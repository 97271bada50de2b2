"""Ghost clipping: DP-SGD's clipped sum from one batched forward and backward, without every example's gradient of
the whole model at once (Goodfellow 2015; Li et al. 2022, "Large Language Models Can Be Strong Differentially
Private Learners"; Bu et al. 2022, mixed ghost clipping and book-keeping).

During the forward pass a ``torch.overrides.TorchFunctionMode`` records every call that takes a parameter: its
inputs and its output. One backward pass gives the loss's gradient with respect to each recorded output; from a
layer's input ``x`` and output gradient ``g`` the per-example gradient norms follow layer by layer:

- convolution and linear weights: with ``T`` positions (pixels, tokens, augmented copies) of ``d`` inputs and
  ``p`` outputs, either the "ghost norm" ``sum_{t,t'} (x_t . x_t') (g_t . g_t')`` (cost ``T^2 (d + p)``, never an
  example's gradient) or the example's ``p x d`` gradient for this one layer, whichever is cheaper (mixed ghost
  clipping); a bias's per-example gradient is ``sum_t g_t``;
- GroupNorm and LayerNorm scales and biases: their per-example gradients (one number per channel) directly.

The clip factors then weight each example's output gradients, and each recorded call's parameters get the
clipped sum from one vector-Jacobian product of that call alone (book-keeping: no second backward pass through
the network). A parameter used by any other operation (weight standardisation, a scale applied to a weight, a
parameter shared by two layers) is refused with the operation and the parameter named.
"""

from __future__ import annotations

from collections.abc import Callable

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fnclass.errors import InputError

SUPPORTED = "convolution (F.conv2d), linear (F.linear), GroupNorm (F.group_norm) and LayerNorm (F.layer_norm)"


class _Record(TorchFunctionMode):
    """Records the calls that take a parameter (``ids``: id of a parameter tensor -> its path)."""

    def __init__(self, ids: dict[int, str]):
        super().__init__()
        self.ids, self.calls, self.seen = ids, [], {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        used = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and id(a) in self.ids]
        out = func(*args, **kwargs)
        if not used or not isinstance(out, torch.Tensor):  # shape, dtype, size(): nothing a gradient flows through
            return out
        names = [self.ids[id(a)] for a in used]
        if func not in _HANDLERS:
            raise InputError(f"privacy.clipping = \"ghost\" does not support {getattr(func, '__name__', func)} on "
                             f"the parameter {names[0]} (it supports {SUPPORTED}, each taking the parameters "
                             "themselves; weight standardisation is one such case): use privacy.clipping = \"vmap\"")
        for name in names:
            if name in self.seen:
                raise InputError(f"privacy.clipping = \"ghost\": the parameter {name} is used by two operations "
                                 "(its per-example gradient is not one layer's): use privacy.clipping = \"vmap\"")
            self.seen[name] = True
        self.calls.append((func, args, kwargs, out))
        return out


def _conv_parts(args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    stride, padding, dilation, groups = ((list(args[3:]) + [None] * 4)[:4])
    stride = kwargs.get("stride", stride if stride is not None else 1)
    padding = kwargs.get("padding", padding if padding is not None else 0)
    dilation = kwargs.get("dilation", dilation if dilation is not None else 1)
    groups = kwargs.get("groups", groups if groups is not None else 1)
    if groups != 1 or isinstance(padding, str):
        raise InputError("privacy.clipping = \"ghost\" supports convolutions with groups = 1 and numeric padding: "
                         "use privacy.clipping = \"vmap\"")
    return x, weight, bias, stride, padding, dilation


def _weight_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example ``|sum_t g_t x_t^T|_F^2`` for x (n, T, d), g (n, T, p): ghost or materialised, the cheaper."""
    t, d, p = x.shape[1], x.shape[2], g.shape[2]
    if t * t <= d * p:  # the ghost norm: Gram matrices of the T positions
        return (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g.transpose(1, 2), x).pow(2).sum((1, 2))  # this layer's per-example gradient, (n, p, d)


def _conv_norms(args, kwargs, g, n):
    x, weight, bias, stride, padding, dilation = _conv_parts(args, kwargs)
    cols = F.unfold(x, weight.shape[-2:], dilation=dilation, padding=padding, stride=stride)  # (rows, d, T)
    rows = cols.shape[0]
    cols = cols.transpose(1, 2).reshape(n, -1, cols.shape[1])  # an example's copies and positions: (n, K T, d)
    grads = g.reshape(rows, g.shape[1], -1).transpose(1, 2).reshape(n, -1, g.shape[1])  # (n, K T, p)
    norms = {weight: _weight_sq_norms(cols, grads)}
    if bias is not None:
        norms[bias] = grads.sum(1).pow(2).sum(1)
    return norms


def _linear_norms(args, kwargs, g, n):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    xs, gs = x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])
    norms = {weight: _weight_sq_norms(xs, gs)}
    if bias is not None:
        norms[bias] = gs.sum(1).pow(2).sum(1)
    return norms


def _affine_norms(weight, bias, g, normed, per_example) -> dict:
    """A normalisation's scale and bias: per-example gradients ``per_example(g * normed)`` and ``per_example(g)``
    (one number per feature), their squared norms."""
    norms = {}
    if weight is not None:
        norms[weight] = per_example(g * normed).pow(2).sum(1)
    if bias is not None:
        norms[bias] = per_example(g).pow(2).sum(1)
    return norms


def _norm_args(args, kwargs, first: str):
    """``(x, groups or shape, weight, bias, eps)`` of an F.group_norm / F.layer_norm call."""
    full = list(args) + [None] * (5 - len(args))
    pick = lambda i, name, default=None: full[i] if full[i] is not None else kwargs.get(name, default)
    return pick(0, "input"), pick(1, first), pick(2, "weight"), pick(3, "bias"), pick(4, "eps", 1e-5)


def _group_norm_norms(args, kwargs, g, n):
    x, groups, weight, bias, eps = _norm_args(args, kwargs, "num_groups")
    normed = F.group_norm(x.detach(), groups, None, None, eps)
    # (rows, C, H, W) -> an example's copies and positions per channel: (n, C, K H W), summed
    per_example = lambda t: t.reshape(n, -1, *t.shape[1:]).transpose(1, 2).reshape(n, t.shape[1], -1).sum(2)
    return _affine_norms(weight, bias, g, normed, per_example)


def _layer_norm_norms(args, kwargs, g, n):
    x, shape, weight, bias, eps = _norm_args(args, kwargs, "normalized_shape")
    normed = F.layer_norm(x.detach(), shape, None, None, eps)
    size = len(shape)
    per_example = lambda t: t.reshape(n, -1, *t.shape[t.ndim - size:]).sum(1).flatten(1)
    return _affine_norms(weight, bias, g, normed, per_example)


_HANDLERS = {F.conv2d: _conv_norms, torch.conv2d: _conv_norms, F.linear: _linear_norms,
             torch._C._nn.linear: _linear_norms, F.group_norm: _group_norm_norms,
             F.layer_norm: _layer_norm_norms}


def ghost_clipped_sum(loss_and_aux: Callable, params, state, images: torch.Tensor, labels: torch.Tensor,
                      key: torch.Tensor, *, n: int, copies: int, max_grad_norm: float, clip_eps: float):
    """``(sum_i clip(g_i) as a list of leaves in params' order, per-example losses (n,), logits (n, classes),
    treedef)`` for ``n`` examples of ``copies`` rows each, from one forward and one backward pass.

    The loss is the batch's mean over its rows (``loss_and_aux``'s contract); example ``i``'s gradient is the mean
    over its copies, as in :func:`fnclass.core.per_example.per_example_grad_and_value`.
    """
    leaves, treedef = optree.tree_flatten(params)
    paths = [".".join(map(str, p)) for p in optree.tree_paths(params)]
    leaves = [leaf.detach().requires_grad_(True) for leaf in leaves]
    live = optree.tree_unflatten(treedef, leaves)
    record = _Record({id(leaf): path for leaf, path in zip(leaves, paths)})
    with torch.enable_grad(), record:
        loss, (_, logits) = loss_and_aux(live, state, images, labels, key)
    outputs = [out for *_, out in record.calls]
    missing = [path for leaf, path in zip(leaves, paths) if path not in record.seen]
    if missing:
        raise InputError(f"privacy.clipping = \"ghost\" found no supported layer using the parameter {missing[0]}: "
                         "use privacy.clipping = \"vmap\"")
    rows = len(images)
    grads = torch.autograd.grad(loss, outputs, retain_graph=True)
    sq = torch.zeros(n, dtype=torch.float64 if leaves[0].dtype == torch.float64 else torch.float32,
                     device=images.device)
    for (func, args, kwargs, _), g in zip(record.calls, grads):
        for tensor, value in _HANDLERS[func](args, kwargs, g.detach() * rows / copies, n).items():
            if id(tensor) in record.ids:  # a parameter's (a constant weight beside a parameter bias: not counted)
                sq = sq + value.to(sq.dtype)
    factor = (max_grad_norm / (sq.sqrt() + clip_eps)).clamp(max=1.0)
    total = {}
    row_factor = factor.repeat_interleave(copies) * rows / copies
    for (_, args, kwargs, out), g in zip(record.calls, grads):
        mine = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and id(a) in record.ids]
        scaled = g * row_factor.view(-1, *[1] * (g.ndim - 1)).to(g.dtype)
        for leaf, grad in zip(mine, torch.autograd.grad(out, mine, scaled, retain_graph=True)):
            total[id(leaf)] = grad
    return [total[id(leaf)].detach() for leaf in leaves], loss.detach(), logits
