import functools
import math
import subprocess
import sys

import pytest
import torch

from fnclass.core import random
from tests.needs import missing


def test_same_key_same_numbers_in_another_process():
    here = random.normal(random.fold_in(random.split(random.key(42), 3)[1], 7), (1000,))
    code = ("import torch; from fnclass.core import random as r;"
            "x = r.normal(r.fold_in(r.split(r.key(42), 3)[1], 7), (1000,));"
            "print(x.double().sum().item(), x[:3].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert float(out[0]) == here.double().sum().item()
    assert out[1].strip() == str(here[:3].tolist())


def test_split_keys_differ_and_are_deterministic():
    keys = random.split(random.key(0), 100)
    assert len({tuple(k.tolist()) for k in keys}) == 100
    assert torch.equal(keys, random.split(random.key(0), 100))
    assert not torch.equal(random.key(0), random.key(1))


def test_fold_in_differs_per_data():
    k = random.key(3)
    words = {tuple(random.fold_in(k, i).tolist()) for i in range(1000)}
    assert len(words) == 1000
    assert torch.equal(random.fold_in(k, torch.tensor(5)), random.fold_in(k, 5))


def test_uniform_and_normal_moments():
    u = random.uniform(random.key(1), (200_000,))
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    z = random.normal(random.key(2), (200_000,))
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1.0) < 0.01
    # Neighbouring draws are uncorrelated.
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 0.01


def test_randint_covers_range_evenly_and_permutation_is_a_permutation():
    r = random.randint(random.key(4), (100_000,), 0, 10)
    counts = torch.bincount(r, minlength=10)
    assert counts.min() > 9_500 and counts.max() < 10_500
    p = random.permutation(random.key(5), 1000)
    assert torch.equal(torch.sort(p).values, torch.arange(1000))
    assert not torch.equal(p, torch.arange(1000))


def test_random_numbers_identical_under_compile():
    def draw(k):
        return random.uniform(random.fold_in(k, 3), (64,))
    k = random.key(9)
    assert torch.equal(torch.compile(draw)(k), draw(k))


GAMMA_SHAPES = (0.2, 0.5, 1.0, 2.5, 10.0)
BETA_SHAPES = ((0.2, 0.2), (1.0, 1.0), (2.0, 5.0))
DRAWS = 20_000


@functools.cache
def _gamma_draws(alpha: float) -> torch.Tensor:
    return random.gamma(random.fold_in(random.key(10), GAMMA_SHAPES.index(alpha)), alpha, (DRAWS,), dtype=torch.float64)


@functools.cache
def _beta_draws(a: float, b: float) -> torch.Tensor:
    return random.beta(random.fold_in(random.key(11), BETA_SHAPES.index((a, b))), a, b, (DRAWS,), dtype=torch.float64)


def _assert_moments(x: torch.Tensor, mean: float, var: float) -> None:
    """Sample mean and variance within 5 standard errors (the variance's from the sample's fourth moment)."""
    centred = x - x.mean()
    sample_var, fourth = centred.pow(2).mean().item(), centred.pow(4).mean().item()
    assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / len(x)), (x.mean().item(), mean)
    assert abs(sample_var - var) < 5 * math.sqrt((fourth - sample_var ** 2) / len(x)), (sample_var, var)


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError:
        missing("scipy is not installed: pip install -e '.[dev]'")
    return stats


@pytest.mark.parametrize("alpha", GAMMA_SHAPES)
def test_gamma_moments(alpha):
    _assert_moments(_gamma_draws(alpha), mean=alpha, var=alpha)


@pytest.mark.parametrize("a, b", BETA_SHAPES)
def test_beta_moments(a, b):
    _assert_moments(_beta_draws(a, b), mean=a / (a + b), var=a * b / ((a + b) ** 2 * (a + b + 1)))


# The keys are fixed, so each p-value is one fixed number: 0.22-0.95 here, while Marsaglia-Tsang's d off by one
# (alpha + 2/3) gives p < 1e-170 for every Gamma shape, and without the boost shape 0.2 fails (d < 0).
@pytest.mark.parametrize("alpha", GAMMA_SHAPES)
def test_gamma_matches_scipy_by_kolmogorov_smirnov(alpha):
    stats = _scipy_stats()
    assert stats.kstest(_gamma_draws(alpha).numpy(), stats.gamma(alpha).cdf).pvalue > 1e-3


@pytest.mark.parametrize("a, b", BETA_SHAPES)
def test_beta_matches_scipy_by_kolmogorov_smirnov(a, b):
    stats = _scipy_stats()
    assert stats.kstest(_beta_draws(a, b).numpy(), stats.beta(a, b).cdf).pvalue > 1e-3


def test_gamma_and_beta_are_functions_of_the_key():
    k = random.key(12)
    for draw in (lambda k: random.gamma(k, 0.5, (1000,)), lambda k: random.beta(k, 2.0, 5.0, (1000,))):
        assert torch.equal(draw(k), draw(k))
        assert not torch.equal(draw(k), draw(random.key(13)))
        assert draw(k).dtype == torch.float32


def test_small_shapes_stay_finite():
    k = random.key(14)
    x = random.gamma(k, 0.05, (5000,))
    assert torch.isfinite(x).all() and (x >= 0).all()
    # Some draws fall below float32's range, none below float64's (the boost is applied in log space).
    assert (x == 0).any() and (random.gamma(k, 0.05, (5000,), dtype=torch.float64) > 0).all()
    # At 0.01 both draws underflow float32 one time in eight: X / (X + Y) taken there would be 0 / 0.
    for a in (0.05, 0.01):
        p = random.beta(k, a, a, (5000,))
        assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
        assert (p < 1e-6).any() and (p > 1 - 1e-6).any(), "Beta(a, a) piles up at both ends for small a"


def test_tensor_shapes_broadcast_like_floats():
    k = random.key(15)
    alphas = torch.tensor([0.5, 2.5])
    both = random.gamma(k, alphas, (500, 2), dtype=torch.float64)
    for column, alpha in enumerate(alphas.tolist()):
        torch.testing.assert_close(both[:, column], random.gamma(k, alpha, (500, 2), dtype=torch.float64)[:, column])
    torch.testing.assert_close(random.beta(k, torch.tensor(2.0), torch.tensor(5.0), (500,)),
                               random.beta(k, 2.0, 5.0, (500,)))


def test_gamma_keeps_the_last_candidate_when_all_are_rejected(monkeypatch):
    # With one candidate per output every rejection falls back to it: the plain proposal d (1 + c z)**3, kept
    # finite and positive even where 1 + c z <= 0.
    monkeypatch.setattr(random, "_GAMMA_CANDIDATES", 1)
    k, d = random.key(16), 1.0 - 1.0 / 3.0
    x = random.gamma(k, 1.0, (DRAWS,), dtype=torch.float64)
    z = random.normal(random.split(k, 3)[0], (1, DRAWS), dtype=torch.float64)[0]
    proposal = d * (1.0 + z / math.sqrt(9.0 * d)) ** 3
    assert (proposal <= 0).any() and (x > 0).all() and torch.isfinite(x).all()
    torch.testing.assert_close(x[proposal > 0], proposal[proposal > 0])
