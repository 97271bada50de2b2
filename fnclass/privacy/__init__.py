"""Differentially private training (DP-SGD, Abadi et al. 2016): the clipped, noised gradient, Poisson batches with
static shapes, and the privacy accounting.

The gradient drops into :func:`fnclass.training.step.make_train_step` as its ``gradient`` argument: each example's
gradient
(``vmap`` of ``grad``, :mod:`fnclass.core.per_example`) is clipped to ``max_grad_norm``, the clipped gradients are
summed, Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` is added and the sum is divided
by the expected batch size; any optimizer transform follows. Batches are Poisson samples (each training example
in with probability ``q``) padded to a fixed size: padded rows carry the label -1 and contribute exactly nothing.

The accountant is Opacus' (``pip install 'fnclass[dp]'``); nothing here computes a privacy bound by hand.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import optree
import torch

from fnclass.core import random
from fnclass.core.per_example import per_example_grad_and_value
from fnclass.errors import InputError

EXAMPLES, NOISE = 0xE7A, 0x4015E  # folded into a step's model key: the examples' keys (dropout), the noise's key
PADDING = -1  # the label of a padded row of a Poisson batch
CLIP_EPS = 1e-6  # Opacus' clip factor max_grad_norm / (norm + 1e-6): the same, so the two agree to the bit's scale
OVERFLOW_TAIL = 1e-10  # the padded batch holds a Poisson sample with probability at least 1 - this, at every step


def clipped_noisy_gradient(max_grad_norm: float, noise_multiplier: float, expected_batch_size: float, *,
                           chunk_size: int | None = None, copies: int = 1, skip_padding: bool = True,
                           secret: torch.Tensor | None = None, process=None, clipping: str = "vmap") -> Callable:
    """DP-SGD's gradient, with the contract of :func:`fnclass.training.step.make_train_step`'s ``gradient`` argument.

    ``(sum_i clip(g_i) + N(0, (noise_multiplier * max_grad_norm)^2 I)) / expected_batch_size`` where ``g_i`` is
    example ``i``'s gradient (averaged over its ``copies`` augmented images) and ``clip(g) = g * min(1,
    max_grad_norm / (|g| + 1e-6))`` (Opacus' factor). Rows labelled :data:`PADDING` are left out exactly. The
    returned loss is the mean loss of the real examples; the model state is returned as it came (a model under
    DP-SGD keeps no batch statistics).

    Args:
      max_grad_norm: the clipping norm C.
      noise_multiplier: sigma; the noise's standard deviation is sigma * C.
      expected_batch_size: what the noised sum is divided by (q * N for Poisson batches; Opacus does the same).
      chunk_size: examples whose per-example gradients are computed at once (None: the whole batch).
      copies: augmented images per example (augmentation multiplicity): ``images`` holds ``copies`` rows per label.
      skip_padding: leave chunks made only of padding uncomputed (eager only: it reads the batch's size on the
        host). Their contribution is exactly zero either way; compiled, every chunk is computed.
      secret: a key known only to the trainer (:func:`new_secret`): the noise is drawn from it and the step's key,
        so the seed, which checkpoints and exports record, does not reveal it. None: from the step's key alone.
      process: a data-parallel job's :class:`fnclass.distributed.Process`: each process clips the examples of its
        shard of the Poisson batch, the clipped sums (and the loss's sum and count) are summed across the processes,
        and the noise is added once to that sum (the same draw on every process, from the shared secret and step
        key), so the result is one process's on the whole batch. The returned gradient then needs no further
        reduction (its ``reduces_over_processes`` is True).
      clipping: ``"vmap"``: each chunk's per-example gradients of the whole model (``vmap`` of ``grad``);
        ``"ghost"``: per-example norms layer by layer from one batched forward and backward pass
        (:mod:`fnclass.privacy.ghost`; eager only, the padding rows left out, ``chunk_size`` unused).
    """
    def gradient(loss_and_aux: Callable, *, compile: bool = False) -> Callable:
        def grad_and_value(params, state, images, labels, key, *scale):
            if scale:
                raise ValueError("loss scaling (fp16) is not supported with per-example gradients")
            n = len(labels)
            valid = labels >= 0 if not labels.is_floating_point() else torch.ones(n, dtype=torch.bool,
                                                                                     device=labels.device)
            targets = labels.clamp_min(0) if not labels.is_floating_point() else labels
            # Padded rows see a zero image, so nothing an unsampled example holds (even an inf) reaches the step.
            rows_valid = valid.repeat_interleave(copies).view(-1, *[1] * (images.ndim - 1))
            images = torch.where(rows_valid, images, torch.zeros((), dtype=images.dtype, device=images.device))
            if clipping == "ghost":
                total, losses, logits = _ghost_sum(loss_and_aux, params, state, images, targets, valid, key,
                                                   copies=copies, max_grad_norm=max_grad_norm)
            else:
                keys = random.split(random.fold_in(key, EXAMPLES), n * (process.world_size if process else 1))
                keys = keys[process.rank * n:(process.rank + 1) * n] if process else keys  # this shard's rows' keys
                used = n if compile or not skip_padding else int(valid.sum())  # real rows first (poisson_sample)
                total, losses, logits = _vmap_sum(loss_and_aux, params, state, images, targets, valid, keys,
                                                  copies=copies, max_grad_norm=max_grad_norm,
                                                  chunk_size=chunk_size or n, used=used)
            return _noised(total, losses, logits, valid, optree.tree_structure(params), key, state)

        def _noised(total, losses, logits, valid, treedef, key, state):
            valid_count = valid.sum()
            loss_sum = torch.where(valid, losses, 0.0).sum()
            if process is not None:  # the whole batch's clipped sum, before the one draw of noise
                total, loss_sum, valid_count = process.all_sum((total, loss_sum, valid_count))
            noise_key = random.fold_in(key if secret is None else mixed(secret, key), NOISE)
            std = noise_multiplier * max_grad_norm
            noised = [(t + std * random.normal64(random.fold_in(noise_key, i), t.shape).to(t)) / expected_batch_size
                      if std else t / expected_batch_size for i, t in enumerate(total)]
            loss = loss_sum / valid_count.clamp_min(1)
            return optree.tree_unflatten(treedef, noised), (loss.detach(), (state, logits))
        return grad_and_value
    gradient.reduces_over_processes = process is not None
    return gradient


def _vmap_sum(loss_and_aux, params, state, images, targets, valid, keys, *, copies, max_grad_norm, chunk_size,
              used):
    """The clipped sum chunk by chunk from per-example gradients of the whole model (``vmap`` of ``grad``);
    chunks past the first ``used`` rows (padding only) are left uncomputed. ``(total leaves, losses (n,), logits)``.
    """
    per_example = per_example_grad_and_value(lambda p, x, y, k: loss_and_aux(p, state, x, y, k), copies=copies)
    n = len(targets)
    total = [torch.zeros_like(leaf) for leaf in optree.tree_leaves(params)]
    losses, logits = [], []
    for start in range(0, n, chunk_size):
        part = slice(start, min(start + chunk_size, n))
        if start >= used and start > 0:
            losses.append(torch.zeros(part.stop - start, device=targets.device))
            logits.append(logits[-1].new_zeros((part.stop - start, *logits[-1].shape[1:])))
            continue
        rows = slice(part.start * copies, part.stop * copies)
        grads, (loss, (_, chunk_logits)) = per_example(params, images[rows], targets[part], keys[part])
        grads = optree.tree_leaves(grads)
        factor = torch.where(valid[part], clip_factor(grads, max_grad_norm), 0.0)
        total = [t + torch.tensordot(factor, g, dims=1) for t, g in zip(total, grads)]
        losses.append(loss)
        logits.append(chunk_logits[:, 0])  # the first copy's logits: the step's accuracy
    return total, torch.cat(losses), torch.cat(logits)


def _ghost_sum(loss_and_aux, params, state, images, targets, valid, key, *, copies, max_grad_norm):
    """The clipped sum by ghost clipping (:mod:`fnclass.privacy.ghost`), eagerly on the real rows alone; padded
    rows get zero logits. ``(total leaves, losses (n,) each the real rows' mean, logits)``."""
    from fnclass.privacy.ghost import ghost_clipped_sum

    n, real = len(targets), valid.nonzero().squeeze(1)
    total, mean_loss, real_logits = ghost_clipped_sum(
        loss_and_aux, params, state, images.reshape(n, copies, *images.shape[1:])[real].flatten(0, 1),
        targets[real].repeat_interleave(copies, dim=0), key, n=len(real), copies=copies,
        max_grad_norm=max_grad_norm, clip_eps=CLIP_EPS)
    first = real_logits.reshape(len(real), copies, -1)[:, 0]
    logits = first.new_zeros((n, first.shape[-1])).index_copy(0, real, first)
    return total, torch.where(valid, mean_loss, 0.0), logits


def new_secret() -> torch.Tensor:
    """A key from 64 bits of the operating system's randomness (``os.urandom``), for a private run's noise and
    Poisson samples."""
    return random.key(int.from_bytes(os.urandom(8), "little"))


def mixed(secret: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """A key derived from ``secret`` and a public ``key`` (a step's): unpredictable without the secret."""
    return random.fold_in(random.fold_in(secret, key[0]), key[1])


def clip_factor(grads: list[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    """``min(1, max_grad_norm / (|g_i| + 1e-6))`` for each example ``i`` of per-example gradient leaves (N, ...)."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def poisson_sample(key: torch.Tensor, n: int, rate: float, size: int):
    """A Poisson sample of ``range(n)`` (each index in with probability ``rate``), padded or cut to ``size``.

    Static shapes and no host sync: the sampled indices come first, in random order, then unsampled ones as
    padding. Should more than ``size`` be sampled (:func:`max_batch_size` makes it rare), a random ``size`` of
    them are kept and the rest counted in ``overflow``, never silently dropped.

    Returns:
      ``(indices (size,), valid (size,) bool, overflow 0-d int64)``.
    """
    k_in, k_order = random.split(key)
    threshold = min(math.floor(rate * 2 ** 32), 2 ** 32)  # a word below it: probability rate, never above it
    chosen = random.bits(k_in, (n,)) < threshold
    priority = chosen.to(torch.int64) * 2 ** 32 + random.bits(k_order, (n,))
    indices = torch.topk(priority, size, sorted=True).indices
    valid = chosen[indices]
    return indices, valid, chosen.sum() - valid.sum()


def max_batch_size(n: int, rate: float, tail: float = OVERFLOW_TAIL) -> int:
    """The smallest ``m`` with ``P(Binomial(n, rate) > m) <= tail``: the padded size of a Poisson batch."""
    k = torch.arange(n + 1, dtype=torch.float64)
    if rate >= 1.0:
        return n
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1) + k * math.log(rate)
               + (n - k) * math.log1p(-rate))
    above = torch.flip(torch.cumsum(torch.flip(torch.exp(log_pmf), [0]), 0), [0])  # above[m] = P(X >= m)
    over = torch.cat([above[1:], torch.zeros(1, dtype=torch.float64)])  # P(X > m)
    return int(torch.nonzero(over <= tail)[0])


def default_delta(n: int) -> float:
    """1/n rounded down to a power of ten strictly below it (1e-5 for CIFAR-10's 50,000 images, 1e-5 for 10,000):
    the usual choice, since delta must be well below 1/n."""
    return 10.0 ** -len(str(n))  # n < 10**digits


class Plan(NamedTuple):
    """A private run's privacy parameters, resolved before its first step (recorded in summary.json)."""

    noise_multiplier: float
    delta: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str
    target_epsilon: float | None
    expected_batch_size: int
    max_batch_size: int
    augmult: int
    poisson_sampling: bool


def plan(privacy, *, n: int, batch_size: int, steps: int) -> Plan:
    """Resolve ``[privacy]`` for a run of ``steps`` batches of expected size ``batch_size`` from ``n`` examples.

    The noise multiplier is the config's, or the smallest the accountant finds for ``target_epsilon`` over the
    run (Opacus' ``get_noise_multiplier``, to 0.01 in epsilon). With both given, a run whose steps would spend
    more than the target is refused.

    Raises:
      InputError: the accountant is not installed, delta >= 1/n, or the run would pass its target epsilon.
    """
    delta = privacy.delta if privacy.delta is not None else default_delta(n)
    if delta >= 1.0 / n:
        raise InputError(f"privacy.delta = {delta} is not below 1 / {n} training images: a delta that large allows "
                         f"leaking a whole example; leave it out (default {default_delta(n):g}) or lower it")
    rate = batch_size / n
    sigma = privacy.noise_multiplier
    if sigma is None:
        get_noise_multiplier = _opacus().accountants.utils.get_noise_multiplier
        with _quiet():
            sigma = float(get_noise_multiplier(target_epsilon=privacy.target_epsilon, target_delta=delta,
                                               sample_rate=rate, steps=steps, accountant=privacy.accountant))
    size = max_batch_size(n, rate) if privacy.poisson_sampling else batch_size
    resolved = Plan(sigma, delta, rate, steps, privacy.max_grad_norm, privacy.accountant, privacy.target_epsilon,
                    batch_size, size, privacy.augmult, privacy.poisson_sampling)
    if privacy.target_epsilon is not None and privacy.noise_multiplier is not None:
        spent = epsilon(resolved, steps)
        if spent > privacy.target_epsilon:
            raise InputError(f"the run's {steps} steps would spend epsilon {spent:.3f} > privacy.target_epsilon = "
                             f"{privacy.target_epsilon} at noise_multiplier {sigma}: train fewer epochs, raise "
                             "privacy.noise_multiplier, or leave it out to have it chosen for the target")
    return resolved


def epsilon(resolved: Plan, steps: int) -> float:
    """The epsilon spent after ``steps`` steps of ``resolved`` (at its delta), by its accountant."""
    if steps == 0:
        return 0.0
    if resolved.noise_multiplier == 0:
        return math.inf  # no noise, no privacy
    accountant = _opacus().accountants.create_accountant(resolved.accountant)
    accountant.history = [(resolved.noise_multiplier, resolved.sample_rate, steps)]
    with _quiet():
        return float(accountant.get_epsilon(delta=resolved.delta))


@contextlib.contextmanager
def _quiet():
    """Opacus' RDP accountant warns when its best order is the largest it tries (a slightly loose bound at large
    epsilon); the epsilon it returns is still an upper bound, which is what is reported."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _opacus():
    """The opacus package (the accountants), or a one-line error saying how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its import warns about unrelated optional packages
            import opacus
            import opacus.accountants.utils  # noqa: F401
    except ImportError:
        raise InputError("[privacy] needs the privacy accountant from Opacus: pip install 'fnclass[dp]'") from None
    return opacus
