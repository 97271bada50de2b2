import subprocess
import sys

import torch

from fnclass import random


def test_same_key_same_numbers_in_another_process():
    here = random.normal(random.fold_in(random.split(random.key(42), 3)[1], 7), (1000,))
    code = ("import torch; from fnclass import random as r;"
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
