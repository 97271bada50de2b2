"""The one-run privacy audit (fnclass.privacy.audit): its bound against an independent computation and against
mechanisms of known epsilon, and end to end on a private run with and without its noise."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from fnclass.config import load_config
from fnclass.core import random
from fnclass.privacy import audit


def _p_value_by_scipy(m, r, v, epsilon, delta):
    """Theorem 5.2's bound of Steinke, Nasr and Jagielski (2023), term by term with scipy's binomial."""
    p = math.exp(epsilon) / (1 + math.exp(epsilon))
    tail = scipy.stats.binom.sf(v - 1, r, p)
    worst = max((scipy.stats.binom.cdf(v - 1, r, p) - scipy.stats.binom.cdf(v - 1 - i, r, p)) / i
                for i in range(1, v + 1)) if v else 0.0
    return min(1.0, tail + 2 * m * delta * worst)


@pytest.mark.parametrize("m,r,v,epsilon,delta", [(1000, 200, 150, 1.0, 1e-5), (1000, 1000, 990, 4.0, 1e-5),
                                                 (50, 20, 20, 2.0, 0.0), (10000, 500, 260, 0.1, 1e-3),
                                                 (10, 4, 0, 0.5, 0.01)])
def test_p_value_is_the_theorems_bound(m, r, v, epsilon, delta):
    assert audit.p_value(m, r, v, epsilon, delta) == pytest.approx(_p_value_by_scipy(m, r, v, epsilon, delta),
                                                                   rel=1e-9, abs=1e-15)


def test_all_guesses_right_without_delta_give_the_closed_form():
    # delta = 0, r = v: P[Binomial(r, p) >= r] = p^r = 0.05 at the bound: epsilon = logit(0.05 ** (1 / r)).
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        assert audit.epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    assert audit.epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance guessing rejects nothing


def test_the_bound_holds_for_randomized_response_of_known_epsilon():
    """Randomized response at epsilon 1 (each canary's bit reported right with probability e / (1 + e)) is exactly
    1-DP: over 400 simulated audits the 95% bound must exceed 1 in about 5% of them at most; a mechanism that
    reports every bit right is bounded far above 1."""
    gen = torch.Generator().manual_seed(0)
    m, epsilon = 1000, 1.0
    rate = math.exp(epsilon) / (1 + math.exp(epsilon))
    correct = (torch.rand(400, m, generator=gen) < rate).sum(1).tolist()
    bounds = {v: audit.epsilon_lower_bound(m, m, v, 0.0) for v in set(correct)}
    over = sum(bounds[v] > epsilon for v in correct)
    assert over <= 0.05 * 400 + 3 * math.sqrt(0.05 * 0.95 * 400), over  # 20 expected at most; 33 is 3 sd over
    assert audit.epsilon_lower_bound(m, m, m, 1e-5) > 5.5


def test_scores_rank_included_canaries_when_the_signal_is_clean():
    key = random.key(3)
    canaries = audit.gradient_canaries(key, 5000, 1000, 1.0)
    assert len(set(canaries.coordinates.tolist())) == 1000 and 400 < int(canaries.included.sum()) < 600
    start = [torch.zeros(5000)]
    end = [torch.zeros(5000).index_put((canaries.coordinates,), -canaries.included.float())]
    found = audit.audit(audit.scores(canaries, start, end), canaries.included, 1e-5)
    assert found.correct == found.guesses  # every guess right
    with pytest.raises(ValueError, match="distinct coordinates"):
        audit.gradient_canaries(key, 10, 11, 1.0)


@pytest.mark.slow
def test_the_audit_passes_a_private_run_and_catches_the_same_run_without_noise(cifar_dir, tmp_path, monkeypatch):
    """A dp.toml-style run claiming epsilon about 1 on 1,000 real images, 5,000 gradient canaries: audited below its
    claim (measured 0.03); the same run with the noise removed from its step (and still claiming epsilon 1) audited
    far above it (measured 2.29: 2,398 of 2,500 guesses right). A fixed secret keeps the test repeatable."""
    from benchmarks.privacy_audit import audited_run
    from fnclass import privacy

    monkeypatch.setattr(privacy, "new_secret", lambda: random.key(2024))

    sets = ["model.widths=[8, 16, 16]", "model.stem_width=8", "model.norm_groups=4", "data.train_limit=1000",
            "data.test_limit=100", "train.batch_size=128", "train.epochs=4", "train.log_every_steps=0",
            "train.tta=false", "privacy.target_epsilon=1.0", "privacy.chunk_size=64"]
    config = load_config("dp", sets)
    noisy = audited_run(config, tmp_path / "noisy", str(cifar_dir), canaries=5000)
    noiseless = audited_run(config, tmp_path / "noiseless", str(cifar_dir), canaries=5000, noise=False)
    assert noisy["claimed_epsilon"] == noiseless["claimed_epsilon"] == pytest.approx(1.0, abs=0.02)
    assert noisy["epsilon_lower_bound"] < noisy["claimed_epsilon"], noisy
    assert noiseless["epsilon_lower_bound"] > 1.5 * noiseless["claimed_epsilon"], noiseless
