"""An empirical privacy audit in one training run (Steinke, Nasr and Jagielski, NeurIPS 2023, "Privacy Auditing with
One (1) Training Run"): a statistical lower bound on the epsilon a run's privacy really is, to hold against the
epsilon it claims.

``m`` canaries are each included in the training with probability 1/2 (independently, from a key the auditor
keeps). After training, the auditor scores every canary from the released model alone, guesses "in" for the
``k`` highest scores and "out" for the ``k`` lowest (abstaining on the rest), and counts the right guesses. Were
the run (epsilon, delta)-DP, that count could exceed a Binomial(r, e^epsilon / (1 + e^epsilon)) draw only with
probability bounded by delta (their Theorem 5.2); :func:`epsilon_lower_bound` is the largest epsilon the count
rejects at the given confidence. A bound above the claimed epsilon proves the claim false; a bound below it is
consistent with the claim and proves nothing more (one run and m canaries can only show so much).

The canaries here are white-box gradient canaries ("Dirac canaries"): canary ``i`` is an example whose clipped
gradient is ``max_grad_norm`` on one coordinate ``j_i`` of the parameters and zero elsewhere, Poisson-sampled at
the run's rate like every example; its score is how far the run moved coordinate ``j_i`` down (``theta_0 -
theta_T``). :func:`with_canaries` wraps a DP gradient so that the sampled included canaries join the clipped sum;
noise is additive and independent of the sum, so adding them after the noise is the same mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import optree
import torch

from fnclass.core import random

CANARY = 0xCA9A  # folded into a step's key for the canaries' Poisson samples


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The largest probability that an (epsilon, delta)-DP run lets an auditor who guesses ``r`` of ``m`` canaries
    get ``v`` or more right (Steinke, Nasr and Jagielski 2023, Theorem 5.2 as their Algorithm 2 computes it):
    ``P[Binomial(r, p) >= v] + 2 m delta max_i P[v - i <= Binomial(r, p) < v] / i`` with ``p = e^eps / (1 +
    e^eps)``, capped at 1."""
    if not 0 <= v <= r <= m or epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need 0 <= v <= r <= m, epsilon >= 0, 0 <= delta <= 1 (got {m=}, {r=}, {v=}, "
                         f"{epsilon=}, {delta=})")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    log_p, log_q = math.log(p), -math.inf if p == 1.0 else math.log1p(-p)

    def pmf(k: int) -> float:
        if log_q == -math.inf:
            return float(k == r)
        return math.exp(math.lgamma(r + 1) - math.lgamma(k + 1) - math.lgamma(r - k + 1) + k * log_p
                        + (r - k) * log_q)

    tail = math.fsum(pmf(k) for k in range(v, r + 1))
    worst, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += pmf(v - i)
        worst = max(worst, below / i)
    return min(1.0, tail + 2 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` right guesses out of ``r`` (of ``m`` canaries) reject at ``confidence``: the
    run is not (epsilon, delta)-DP for any epsilon below it, with probability ``confidence``. 0 when nothing is
    rejected. Bisection to 1e-6."""
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    high = 1.0
    while p_value(m, r, v, high, delta) < alpha:
        high *= 2
        if high > 1e3:
            return math.inf
    low = 0.0
    while high - low > 1e-6:
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < alpha else (low, middle)
    return low


class Canaries(NamedTuple):
    """``m`` gradient canaries: the flat parameter coordinate of each, whether it is in the training, and the norm
    of its (already clipped) gradient."""

    coordinates: torch.Tensor  # (m,) int64, distinct
    included: torch.Tensor  # (m,) bool, each True with probability 1/2
    norm: float


def gradient_canaries(key: torch.Tensor, num_params: int, m: int, norm: float) -> Canaries:
    """``m`` canaries on distinct coordinates of ``num_params``, each included with probability 1/2, from ``key``
    (the auditor's: the run must not know it)."""
    if not 0 < m <= num_params:
        raise ValueError(f"{m} canaries need as many distinct coordinates; the model has {num_params}")
    k_where, k_in = random.split(key)
    return Canaries(random.permutation(k_where, num_params)[:m], random.bits(k_in, (m,)) < 2 ** 31, norm)


def with_canaries(gradient: Callable, canaries: Canaries, rate: float, expected_batch_size: float) -> Callable:
    """A DP gradient transform (:func:`fnclass.privacy.clipped_noisy_gradient`'s contract) whose clipped sum also
    holds the included canaries a step samples, each with probability ``rate`` from the step's key.

    The wrapped gradient is ``(sum + noise) / B``; the canaries' ``norm * e_j`` are added as ``/ B`` after it.
    ``initial`` (an attribute of the result) holds a copy of the first parameters the gradient saw: the run's start,
    from which the scores are measured.
    """
    threshold = min(math.floor(rate * 2 ** 32), 2 ** 32)

    def transform(loss_and_aux: Callable, *, compile: bool = False) -> Callable:
        inner = gradient(loss_and_aux, compile=compile)

        def grad_and_value(params, state, images, labels, key, *scale):
            if transform.initial is None:
                transform.initial = [leaf.detach().clone() for leaf in optree.tree_leaves(params)]
            grads, aux = inner(params, state, images, labels, key, *scale)
            leaves, treedef = optree.tree_flatten(grads)
            sampled = canaries.included.to(key.device) & (
                random.bits(random.fold_in(key, CANARY), canaries.included.shape) < threshold)
            flat = torch.zeros(sum(leaf.numel() for leaf in leaves), dtype=torch.float64, device=key.device)
            flat.index_add_(0, canaries.coordinates.to(key.device), sampled.to(torch.float64))
            flat = flat * (canaries.norm / expected_batch_size)
            out, start = [], 0
            for leaf in leaves:
                out.append(leaf + flat[start:start + leaf.numel()].view_as(leaf).to(leaf.dtype))
                start += leaf.numel()
            return optree.tree_unflatten(treedef, out), aux
        return grad_and_value

    transform.initial = None
    transform.reduces_over_processes = getattr(gradient, "reduces_over_processes", False)
    return transform


def scores(canaries: Canaries, initial: list[torch.Tensor], final: list[torch.Tensor]) -> torch.Tensor:
    """Each canary's score: how far the run moved its coordinate down, ``theta_0 - theta_T`` (a canary's gradient
    pushes its coordinate down whenever it is sampled)."""
    start = torch.cat([leaf.detach().double().flatten().cpu() for leaf in initial])
    end = torch.cat([leaf.detach().double().flatten().cpu() for leaf in final])
    return (start - end)[canaries.coordinates.cpu()]


class Audit(NamedTuple):
    """One audit's outcome: the bound and the guesses it came from."""

    epsilon_lower_bound: float
    confidence: float
    canaries: int
    guesses: int
    correct: int
    k: int


def audit(scores: torch.Tensor, included: torch.Tensor, delta: float, *, confidence: float = 0.95,
          ks: tuple[int, ...] | None = None) -> Audit:
    """Guess "in" for the ``k`` highest scores and "out" for the ``k`` lowest, for each ``k`` of ``ks``, and report
    the largest bound; each ``k`` is tested at ``1 - (1 - confidence) / len(ks)`` (Bonferroni), so the reported
    bound holds at ``confidence`` though the best ``k`` was picked after seeing the guesses.

    ``ks``: by default ``m / 2**i`` for i = 1..8 (at least 1): from guessing every canary to guessing 1 in 256.
    """
    m = len(scores)
    ks = ks or tuple(sorted({max(1, m // 2 ** i) for i in range(1, 9)}))
    order = torch.argsort(scores.double(), descending=True, stable=True)
    truth = included.cpu()[order]
    each = 1.0 - (1.0 - confidence) / len(ks)
    best = None
    for k in ks:
        if 2 * k > m:
            raise ValueError(f"k = {k} guesses on each side need 2k <= m = {m} canaries")
        correct = int(truth[:k].sum()) + int((~truth[-k:]).sum())
        result = Audit(epsilon_lower_bound(m, 2 * k, correct, delta, each), confidence, m, 2 * k, correct, k)
        if best is None or result.epsilon_lower_bound > best.epsilon_lower_bound:
            best = result
    return best
