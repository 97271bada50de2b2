"""EK-FAC influence functions: which training examples a prediction depends on, through a curvature estimate.

The influence of up-weighting a training example ``z`` on a test output ``f`` (Koh & Liang 2017) is

    d f(theta*) / d w_z = -(1/N) grad f^T H^-1 grad loss(z)

with ``H`` the Hessian of the mean training loss. As in Grosse et al. 2023 ("Studying Large Language Model
Generalization with Influence Functions") and Kronfluence, ``H`` is the Fisher (the Gauss-Newton matrix of the
cross-entropy: gradients of the loss at labels drawn from the model's own predictions), approximated layer by layer
with eigenvalue-corrected Kronecker factors (George et al. 2018, "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis"). For a convolution or linear layer with inputs ``a_t`` (a patch at position ``t``,
with a trailing 1 when the layer has a bias) and output gradients ``g_t``, an example's gradient is
``G = sum_t g_t a_t^T`` and

- ``A = E[sum_t a_t a_t^T]`` and ``S = E[sum_t g_t g_t^T]`` (the Kronecker factors), with eigenvectors ``Q_A``,
  ``Q_S``;
- ``Lambda = E[(Q_S^T G Q_A)^2]`` (the eigenvalue correction: the Fisher's diagonal in the Kronecker eigenbasis);
- ``H^-1 V ~= Q_S ((Q_S^T V Q_A) / (Lambda + lambda)) Q_A^T`` with damping ``lambda = damping x mean(Lambda)``
  (Kronfluence's heuristic with ``damping = 0.1``).

The layers' inputs and output gradients come from a functional tap: a ``torch.overrides.TorchFunctionMode`` that
records every ``F.conv2d`` and ``F.linear`` call taking a parameter during one batched forward (BatchNorm with its
running statistics, as ``fnclass grads``), then one backward pass to the recorded outputs. No module hooks: the model
stays a pure function. Covered: every convolution (``groups = 1``, numeric padding) and linear layer whose weight is a
parameter, and its bias. Normalisation scales and biases and the bias of a frozen-weight convolution (the whitening
stem) are left out, as Kronfluence leaves out every module but ``Linear`` and ``Conv2d``; a parameter used any other
way (weight standardisation, a weight shared by two layers) is refused with one line naming it.

Scores (``(T, N)``): ``-(1/N) grad margin(z')^T H^-1 grad loss(z)``, TRAK's margin on the test side and the plain
cross-entropy on the training side: the first-order change of the test margin when ``z``'s loss weight goes from 1
to 2 (removing ``z`` moves it by about minus the score), the quantity :mod:`fnclass.training.metagrad` computes
exactly. Positive scores are proponents. Self-influence: ``(1/N) grad loss(z)^T H^-1 grad loss(z)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fnclass.core import random
from fnclass.core.losses import margin, per_example_cross_entropy
from fnclass.errors import InputError

DEFAULT_DAMPING = 0.1  # x the mean corrected eigenvalue of each layer: Kronfluence's heuristic (damping_factor=None)
SUPPORTED = "convolutions (F.conv2d, groups = 1, numeric padding) and linear layers (F.linear)"
_CONV = (F.conv2d, torch.conv2d)
_LINEAR = (F.linear, torch._C._nn.linear)
_LEFT_OUT = (F.batch_norm, torch.batch_norm, F.group_norm, torch.group_norm, F.layer_norm, torch.layer_norm)


class _Call(NamedTuple):
    """One recorded layer: its weight's path, the function, its arguments and its output."""

    name: str
    func: Callable
    args: tuple
    kwargs: dict
    out: torch.Tensor


class _Tap(TorchFunctionMode):
    """Records the conv/linear calls whose weight is a parameter (``ids``: id of a parameter tensor -> its path)."""

    def __init__(self, ids: dict[int, str], only=None):
        super().__init__()
        self.ids, self.only, self.calls, self.seen = ids, only, [], set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        used = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and id(a) in self.ids]
        out = func(*args, **kwargs)
        if not used or not isinstance(out, torch.Tensor):  # shape, size(), dtype: nothing a gradient flows through
            return out
        names = [self.ids[id(a)] for a in used]
        if func in _LEFT_OUT:
            return out
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if func not in _CONV + _LINEAR:
            raise InputError(f"--method ekfac: the parameter {names[0]} goes through "
                             f"{getattr(func, '__name__', func)} (EK-FAC covers {SUPPORTED}, each taking the "
                             "parameters themselves; weight standardisation is one such case): use --method tracin "
                             "or trak")
        if weight is None or id(weight) not in self.ids:  # a frozen weight (the whitening stem): its bias left out
            return out
        if self.only is not None and self.ids[id(weight)] not in self.only:
            return out
        if func in _CONV:
            _conv_geometry(args, kwargs)
        for name in names:
            if name in self.seen:
                raise InputError(f"--method ekfac: the parameter {name} is used by two layers (EK-FAC's factors are "
                                 "one layer's): use --method tracin or trak")
            self.seen.add(name)
        self.calls.append(_Call(self.ids[id(weight)], func, args, kwargs, out))
        return out


def _conv_geometry(args, kwargs):
    """``(stride, padding, dilation)`` of an F.conv2d call; one line for what EK-FAC does not cover."""
    stride, padding, dilation, groups = (list(args[3:]) + [None] * 4)[:4]
    stride = kwargs.get("stride", 1 if stride is None else stride)
    padding = kwargs.get("padding", 0 if padding is None else padding)
    dilation = kwargs.get("dilation", 1 if dilation is None else dilation)
    groups = kwargs.get("groups", 1 if groups is None else groups)
    if groups != 1 or isinstance(padding, str) and padding != "valid":
        raise InputError(f"--method ekfac covers {SUPPORTED}; this model has a convolution with groups={groups}, "
                         f"padding={padding!r}: use --method tracin or trak")
    return stride, 0 if padding == "valid" else padding, dilation


def _bias_of(call: _Call):
    return call.args[2] if len(call.args) > 2 else call.kwargs.get("bias")


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int | float) else (int(value[0]), int(value[1]))


def _patches(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """``F.unfold(x, ...).transpose(1, 2)``: each position's patch, ``(n, T, c k_h k_w)`` in unfold's order. Without
    dilation it is a strided view of the padded input copied once (F.unfold's im2col ran 10-20x slower here)."""
    if _pair(dilation) != (1, 1):
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    padded = F.pad(x, (pw, pw, ph, ph))
    windows = padded.unfold(2, kh, sh).unfold(3, kw, sw)  # (n, c, H', W', kh, kw)
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(len(x), -1, x.shape[1] * kh * kw)


def _inputs(call: _Call, n: int) -> torch.Tensor:
    """The layer's inputs per example and position, ``(n, T, d)``, with a trailing 1 when it has a bias."""
    x, weight = call.args[0].detach(), call.args[1]
    if call.func in _CONV:
        stride, padding, dilation = _conv_geometry(call.args, call.kwargs)
        a = _patches(x, weight.shape[-2:], stride, padding, dilation)
    else:
        a = x.reshape(n, -1, x.shape[-1])
    if _bias_of(call) is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
    return a


def _outputs(call: _Call, g: torch.Tensor, n: int) -> torch.Tensor:
    """The output gradient per example and position, ``(n, T, p)``."""
    if call.func in _CONV:
        return g.reshape(n, g.shape[1], -1).transpose(1, 2)
    return g.reshape(n, -1, g.shape[-1])


class Layer(NamedTuple):
    """One covered layer's parameters: ``weight`` (and ``bias``) paths and their shapes."""

    weight: str
    bias: str | None
    shape: tuple[int, ...]


class Tapped(NamedTuple):
    """What one batched forward and backward recorded: the covered layers, their calls and output gradients, the
    logits and the parameters left out. :meth:`pairs` gives each layer's ``(a, g)`` in turn."""

    layers: list[Layer]
    calls: list[_Call]
    grads: list[torch.Tensor]
    logits: torch.Tensor
    left_out: list[str]

    def pairs(self):
        """Per layer: the inputs ``a`` ``(n, T, d)`` and the gradients ``g`` ``(n, T, p)`` of each example's own
        output with respect to the layer's outputs, built one layer at a time (a convolution's unfolded patches
        are the largest tensor)."""
        n = len(self.logits)
        for call, g in zip(self.calls, self.grads):
            yield _inputs(call, n), _outputs(call, g, n)


def layer_tap(model, params, state, images: torch.Tensor, output: Callable, labels: torch.Tensor,
              only=None) -> Tapped:
    """One batched forward (evaluation mode: examples do not interact) and one backward of
    ``output(logits, labels).sum()`` to the outputs of every covered layer (of the layers whose weight path is in
    ``only``, when given)."""
    leaves, treedef = optree.tree_flatten(params)
    paths = [".".join(map(str, p)) for p in optree.tree_paths(params)]
    live = [leaf.detach().requires_grad_(True) for leaf in leaves]
    ids = {id(leaf): path for leaf, path in zip(live, paths)}
    tap = _Tap(ids, only)
    with torch.enable_grad(), tap:
        logits, _ = model.apply(optree.tree_unflatten(treedef, live), state, images, train=False)
    if not tap.calls:
        raise InputError(f"--method ekfac found no layer it covers ({SUPPORTED}) in this model: use --method tracin "
                         "or trak")
    grads = torch.autograd.grad(output(logits, labels).sum(), [call.out for call in tap.calls])
    layers, covered = [], set()
    for call in tap.calls:
        bias = _bias_of(call)
        layers.append(Layer(call.name, ids[id(bias)] if bias is not None and id(bias) in ids else None,
                            tuple(call.args[1].shape)))
        covered.update(filter(None, layers[-1][:2]))
    return Tapped(layers, tap.calls, [g.detach() for g in grads], logits.detach(), sorted(set(paths) - covered))


def example_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each example's gradient of one layer, ``(n, p, d)`` (``sum_t g_t a_t^T``; the bias is the last column)."""
    return torch.bmm(g.transpose(1, 2), a)


def sample_labels(key: torch.Tensor, logits: torch.Tensor, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One label per row drawn from ``softmax(logits)``: inverse CDF of a float64 uniform per row, from ``key``
    (or the given ``uniforms``, ``(n, 1)``)."""
    if uniforms is None:
        uniforms = random.uniform(key, (len(logits), 1), dtype=torch.float64)
    cdf = logits.detach().double().softmax(-1).cumsum(-1)
    return (cdf < uniforms.to(cdf.device)).sum(-1).clamp(max=logits.shape[-1] - 1)


def sampled_cross_entropy(uniforms: torch.Tensor) -> Callable:
    """``fn(logits, labels) -> (n,)``: the cross-entropy at labels drawn from the model's own predictions (the true
    Fisher's; :func:`sample_labels` with these ``uniforms``); ``labels`` is ignored."""
    return lambda logits, labels: per_example_cross_entropy(logits, sample_labels(None, logits, uniforms))


class Factors(NamedTuple):
    """The fitted EK-FAC approximation: per covered layer, ``Q_A``, ``Q_S``, the corrected eigenvalues ``Lambda``
    (``(p, d)``) and the damping added to them (float64); the training set's size ``N`` (the scores' ``1/N``); the
    parameters it leaves out; the layers it was restricted to."""

    layers: list[Layer]
    q_a: list[torch.Tensor]
    q_s: list[torch.Tensor]
    eigenvalues: list[torch.Tensor]
    damping: list[float]
    examples: int
    left_out: list[str]
    only: frozenset[str] | None = None

    def rotate(self, i: int, grads: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s ``(k, p, d)`` gradients in its Kronecker eigenbasis, ``Q_S^T G Q_A``, in their dtype."""
        return self.q_s[i].T.to(grads) @ grads @ self.q_a[i].to(grads)

    def rotated(self, i: int, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``Q_S^T G Q_A`` of each example from the tap (``G = sum_t g_t a_t^T``): either ``G`` rotated, or the
        inputs and output gradients rotated first (``sum_t (Q_S^T g_t) (Q_A^T a_t)^T``), whichever costs fewer
        multiplications (``p d (p + d)`` against ``T (p^2 + d^2)``, with ``T p d`` for ``G`` either way)."""
        t, d, p = a.shape[1], a.shape[2], g.shape[2]
        if t * (p * p + d * d) < p * d * (p + d):
            return example_gradients(a @ self.q_a[i].to(a), g @ self.q_s[i].to(g))
        return self.rotate(i, example_gradients(a, g))

    def inverse(self, i: int, grads: torch.Tensor) -> torch.Tensor:
        """``(F + lambda I)^-1`` of layer ``i`` applied to its ``(k, p, d)`` gradients (float64)."""
        rotated = self.rotate(i, grads.double())
        return self.q_s[i] @ (rotated / (self.eigenvalues[i] + self.damping[i])) @ self.q_a[i].T

    def quadratic(self, i: int, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``g^T (F + lambda I)^-1 g`` of layer ``i`` per example (from its tap, :meth:`rotated`), ``(k,)``
        float64."""
        rotated = self.rotated(i, a, g)
        return (rotated * rotated / (self.eigenvalues[i] + self.damping[i]).to(rotated)).sum((1, 2),
                                                                                          dtype=torch.float64)


def _batches(n: int, chunk_size: int | None) -> list[slice]:
    step = chunk_size or max(n, 1)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def fit(model, params, state, images: torch.Tensor, *, key: torch.Tensor, damping: float = DEFAULT_DAMPING,
        chunk_size: int | None = None, only=None, train_size: int | None = None,
        progress: Callable | None = None) -> Factors:
    """EK-FAC's factors of ``model`` at ``params`` on ``images`` (preprocessed): two passes, the Kronecker factors
    and then the eigenvalue correction, both from the gradients at labels drawn from the model (``key``: one uniform
    per example, so the same draws in both passes and for any ``chunk_size``). ``damping`` is a multiple of each
    layer's mean corrected eigenvalue. Factors and eigenvalues are accumulated in float64; each chunk's sums and
    each example's gradient are formed in the model's dtype. ``only``: the weight paths of the layers to cover
    (default: every layer the tap covers). ``train_size``: the ``N`` of the scores' ``1/N``, the training set's
    size when ``images`` is a sample of it (default ``len(images)``)."""
    only = frozenset(only) if only is not None else None
    if not damping >= 0:
        raise InputError(f"--damping {damping}: expected a number >= 0 (a multiple of each layer's mean corrected "
                         "eigenvalue), e.g. 0.1")
    chunks = _batches(len(images), chunk_size)
    labels = torch.zeros(len(images), dtype=torch.int64, device=images.device)
    uniforms = random.uniform(key, (len(images), 1), dtype=torch.float64)  # one draw per example, whatever the chunks
    loss = lambda c: sampled_cross_entropy(uniforms[chunks[c]])
    sums_a, sums_s, tapped = None, None, None
    for c, part in enumerate(chunks):
        tapped = layer_tap(model, params, state, images[part], loss(c), labels[part], only)
        if sums_a is None:
            sums_a, sums_s = [0] * len(tapped.calls), [0] * len(tapped.calls)
        for i, (a, g) in enumerate(tapped.pairs()):  # each chunk's sum in the model's dtype, the total in float64
            a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            sums_a[i] = sums_a[i] + (a.T @ a).double()
            sums_s[i] = sums_s[i] + (g.T @ g).double()
        if progress:
            progress(part.stop, 2 * len(images))
    q_a = [torch.linalg.eigh(a / len(images)).eigenvectors for a in sums_a]
    q_s = [torch.linalg.eigh(s / len(images)).eigenvectors for s in sums_s]
    factors = Factors(tapped.layers, q_a, q_s, [], [], train_size or len(images), tapped.left_out, only)
    eigenvalues = [0] * len(q_a)
    for c, part in enumerate(chunks):
        for i, (a, g) in enumerate(layer_tap(model, params, state, images[part], loss(c), labels[part],
                                             only).pairs()):
            rotated = factors.rotated(i, a, g)
            eigenvalues[i] = eigenvalues[i] + (rotated * rotated).sum(0, dtype=torch.float64)
        if progress:
            progress(len(images) + part.stop, 2 * len(images))
    eigenvalues = [lam / len(images) for lam in eigenvalues]
    return factors._replace(eigenvalues=eigenvalues, damping=[damping * float(lam.mean()) for lam in eigenvalues])


def scores(factors: Factors, model, params, state, train_images: torch.Tensor, train_labels: torch.Tensor,
           test_images: torch.Tensor, test_labels: torch.Tensor, *, chunk_size: int | None = None,
           progress: Callable | None = None) -> torch.Tensor:
    """``(T, N)`` influence scores (module docstring): ``-(1/N) grad margin(test)^T H^-1 grad loss(train)``, with
    ``N`` the examples the factors were fitted on."""
    tests = [[] for _ in factors.layers]
    for part in _batches(len(test_images), chunk_size):
        for i, (a, g) in enumerate(layer_tap(model, params, state, test_images[part], margin, test_labels[part],
                                             factors.only).pairs()):
            tests[i].append(factors.inverse(i, example_gradients(a, g)).flatten(1))
    tests = [torch.cat(parts) for parts in tests]
    out = torch.zeros(len(test_images), len(train_images), dtype=torch.float64, device=train_images.device)
    for part in _batches(len(train_images), chunk_size):
        tapped = layer_tap(model, params, state, train_images[part], per_example_cross_entropy, train_labels[part],
                           factors.only)
        for v, (a, g) in zip(tests, tapped.pairs()):
            grads = example_gradients(a, g).flatten(1)
            out[:, part] -= (v.to(grads) @ grads.T).double()
        if progress:
            progress(part.stop, out.shape[-1])
    return (out / factors.examples).float()


def self_influence(factors: Factors, model, params, state, images: torch.Tensor, labels: torch.Tensor, *,
                   chunk_size: int | None = None, progress: Callable | None = None) -> torch.Tensor:
    """``(N,)``: ``(1/N) grad loss(z)^T H^-1 grad loss(z)`` for every example (module docstring)."""
    out = torch.zeros(len(images), dtype=torch.float64, device=images.device)
    for part in _batches(len(images), chunk_size):
        tapped = layer_tap(model, params, state, images[part], per_example_cross_entropy, labels[part], factors.only)
        for i, (a, g) in enumerate(tapped.pairs()):
            out[part] += factors.quadratic(i, a, g)
        if progress:
            progress(part.stop, out.shape[-1])
    return (out / factors.examples).float()


def auto_chunk_size(model, params, state, image: torch.Tensor, budget: int, limit: int | None = None) -> int:
    """The largest chunk whose tap fits ``budget`` bytes, from one example: every layer's output gradient held at
    once, plus the largest layer's unfolded inputs and gradient (twice: the rotation's temporaries), plus the
    forward pass's activations (as large as the output gradients again)."""
    tapped = layer_tap(model, params, state, image[None], per_example_cross_entropy,
                       torch.zeros(1, dtype=torch.int64, device=image.device))
    held = sum(g.numel() for g in tapped.grads)
    largest = max(a.numel() + 2 * a.shape[-1] * g.shape[-1] for a, g in tapped.pairs())
    per_example = (2 * held + 2 * largest) * image.element_size() * 2
    size = max(1, budget // max(per_example, 1))
    return int(min(size, limit)) if limit else int(size)


__all__ = ["DEFAULT_DAMPING", "Factors", "Layer", "Tapped", "auto_chunk_size", "example_gradients", "fit", "layer_tap",
           "sampled_cross_entropy", "scores", "self_influence"]
