"""DP-SGD through the whole training program (`fnclass.train`, as `fnclass train` runs it) on real CIFAR-10: what a
private run adds, samples and reports is measured from the run itself, never read back from its plan.

Each test here was seen failing on the break of the program it guards (issue 26): (a) the noise multiplier handed
to the step set to 0; (b) fixed-size shuffled batches in place of Poisson samples; (c) the sampler drawing at 1.3x
the rate the accountant is given; (d) the Poisson samples drawn from the seed's keys instead of the run's secret;
and the float64 normals of the noise replaced by the 24-bit ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fnclass import privacy
from fnclass.config import load_config
from fnclass.core import random
from fnclass.training.program import train

# A tiny GroupNorm model, plain SGD at a constant rate: an update is exactly -lr x the DP gradient.
PLAIN = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8", "model.norm=group",
         "model.norm_groups=4", "model.attn_after=[]", "optim.name=sgd", "optim.momentum=0", "optim.nesterov=false",
         "optim.schedule=constant", "optim.weight_decay=0", "data.test_limit=100", "train.tta=false",
         "privacy.max_grad_norm=1.0", "privacy.chunk_size=64"]


def _run(cifar_dir: Path, out: Path, sets: list[str], secret: int, monkeypatch) -> tuple[dict, list[dict], dict]:
    """A private run with a chosen secret (a test's way to repeat one: never share a secret between real runs):
    its summary, its step rows and its final parameters."""
    monkeypatch.setattr(privacy, "new_secret", lambda: random.key(secret))
    summary = train(load_config(None, [*PLAIN, *sets]), out, data_dir=str(cifar_dir)).summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = safetensors.torch.load_file(out / "checkpoints/last.safetensors")
    params = {name: value for name, value in weights.items() if name.startswith("params.")}
    return summary, [row for row in rows if row["kind"] == "step"], params


def _difference(a: dict, b: dict) -> torch.Tensor:
    assert a.keys() == b.keys()
    return torch.cat([(a[name].double() - b[name].double()).flatten() for name in sorted(a)])


def test_a_private_steps_update_carries_noise_of_sigma_c_over_b(cifar_dir, tmp_path, monkeypatch):
    """One step on 64 images at sampling rate 1 (every example in the batch), twice from the same start, samples
    and secret: with noise multiplier sigma and without. The updates differ by exactly lr x the noise / B, so their
    difference over the P coordinates must be N(0, (lr sigma C / B)^2) draws: a run that adds no noise, or noise
    of another scale, fails."""
    lr, sigma, clip, batch = 0.5, 2.0, 1.0, 64
    sets = ["data.train_limit=64", f"train.batch_size={batch}", "train.epochs=1", f"optim.lr={lr}",
            "train.log_every_steps=1"]
    noisy, steps, params = _run(cifar_dir, tmp_path / "noisy", [*sets, f"privacy.noise_multiplier={sigma}"], 7,
                                monkeypatch)
    _, _, clean = _run(cifar_dir, tmp_path / "clean", [*sets, "privacy.noise_multiplier=0"], 7, monkeypatch)
    assert noisy["privacy"]["noise_multiplier"] == sigma and noisy["privacy"]["steps"] == 1
    assert [row["examples"] for row in steps] == [batch]  # rate 1: all 64, so the two runs' samples are equal
    z = _difference(params, clean) / (lr * sigma * clip / batch)  # the noise draws, in standard deviations
    n = len(z)
    assert n > 5_000
    assert abs(float(z.mean())) < 5 / math.sqrt(n), float(z.mean())
    assert abs(float(z.std()) - 1) < 5 / math.sqrt(2 * n), float(z.std())
    # The noise comes from the run's secret: another secret, the same seed, config and samples: other noise.
    _, _, other = _run(cifar_dir, tmp_path / "other", [*sets, f"privacy.noise_multiplier={sigma}"], 8, monkeypatch)
    correlation = float(torch.corrcoef(torch.stack([_difference(params, clean), _difference(other, clean)]))[0, 1])
    assert abs(correlation) < 5 / math.sqrt(n), correlation


def _binomial_bounds(counts: list[int], n: int, rate: float) -> None:
    """The batch sizes of T steps are T independent Binomial(n, rate) draws: their mean and variance within 4.5
    standard errors of n q and n q (1 - q) (the variance's standard error from the binomial's fourth moment)."""
    t = len(counts)
    values = torch.tensor(counts, dtype=torch.float64)
    mean, var = n * rate, n * rate * (1 - rate)
    mu4 = n * rate * (1 - rate) * (1 + 3 * (n - 2) * rate * (1 - rate))  # the binomial's fourth central moment
    assert abs(float(values.mean()) - mean) < 4.5 * math.sqrt(var / t), (float(values.mean()), mean)
    var_se = math.sqrt((mu4 - var ** 2 * (t - 3) / (t - 1)) / t)
    assert abs(float(values.var()) - var) < 4.5 * var_se, (float(values.var()), var, var_se)


def test_batches_are_poisson_samples_at_the_accounted_rate_from_the_secret(cifar_dir, tmp_path, monkeypatch):
    """100 steps of expected batch 32 from 640 images: the sizes the steps trained on (logged by the run) are
    Binomial(640, 1/20) draws, the rate the accountant was given; the reported epsilon is the accountant's for the
    noise, rate and steps the run used; another secret, the same seed: other samples."""
    n, batch, epochs = 640, 32, 5
    sets = [f"data.train_limit={n}", f"train.batch_size={batch}", f"train.epochs={epochs}", "optim.lr=0.1",
            "train.log_every_steps=1", "privacy.noise_multiplier=1.5"]
    summary, steps, _ = _run(cifar_dir, tmp_path / "a", sets, 11, monkeypatch)
    counts = [row["examples"] for row in steps]
    report = summary["privacy"]
    assert len(counts) == report["steps"] == summary["steps"] == epochs * (n // batch)
    assert report["sample_rate"] == batch / n and report["poisson_sampling"] is True
    assert max(counts) <= report["max_batch_size"] == privacy.max_batch_size(n, batch / n)
    _binomial_bounds(counts, n, report["sample_rate"])  # the rate actually sampled is the one accounted
    from opacus.accountants import RDPAccountant  # the dev extra

    accountant = RDPAccountant()
    accountant.history = [(1.5, batch / n, len(counts))]
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(delta=report["delta"]), rel=1e-12)
    # The samples come from the secret: with the seed fixed, another secret draws other batches (the seed is in
    # config.toml and every checkpoint; were the samples drawn from it, anyone could regenerate them).
    _, again, _ = _run(cifar_dir, tmp_path / "b", [*sets[:2], "train.epochs=1", *sets[3:]], 11, monkeypatch)
    _, other, _ = _run(cifar_dir, tmp_path / "c", [*sets[:2], "train.epochs=1", *sets[3:]], 12, monkeypatch)
    first = counts[:len(again)]
    assert [row["examples"] for row in again] == first  # the same secret and seed: the same samples
    assert [row["examples"] for row in other] != first
