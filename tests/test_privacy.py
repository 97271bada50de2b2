"""DP-SGD (fnclass.privacy) against a per-example loop, Opacus' GradSampleModule + DPOptimizer, scipy and the
accountant; Poisson batches; a real private run, resumed; and what is refused."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import warnings

import pytest
import safetensors.torch
import torch

import fnclass
from fnclass import privacy
from fnclass.config import ConfigError, ModelConfig, load_config
from fnclass.core import random, tree
from fnclass.core.losses import cross_entropy
from fnclass.models import build_model, resolve
from tests.oneline import one_error_line
from tests.torch_reference import reference_module, torch_name

# No attention layer: Opacus' hooks cannot take nn.MultiheadAttention (its DPMultiheadAttention has other weights).
SMALL = ModelConfig(name="tiny", widths=(8, 16, 16), stem_width=8, norm="group", norm_groups=4, attn_after=())


def _setup(cfg=SMALL, n=12, seed=0):
    model = build_model(cfg)
    params, state = model.init(fnclass.key(seed))
    gen = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return model, params, state, images, labels


def _loss_and_aux(model):
    """make_train_step's loss_and_aux for ``model``: mean cross-entropy in training mode."""
    def loss_and_aux(params, state, images, labels, key):
        logits, new_state = model.apply(params, state, images, train=True, key=key)
        return cross_entropy(logits, labels), (new_state, logits.detach())
    return loss_and_aux


def _dp_grads(model, params, state, images, labels, *, clip, sigma=0.0, batch=None, key=None, **options):
    gradient = privacy.clipped_noisy_gradient(clip, sigma, batch or len(labels), **options)
    grads, (loss, _) = gradient(_loss_and_aux(model))(params, state, images, labels,
                                                      fnclass.key(5) if key is None else key)
    return tree.flatten_paths(grads), loss


def _loop_grads(model, params, state, images, labels, *, clip, copies=1, batch=None):
    """The clipped sum by hand, one example at a time, in float64 (Opacus' factor min(1, C / (|g| + 1e-6)))."""
    params64 = tree.tree_map(lambda p: p.double(), params)
    total = None
    for i in range(len(labels)):
        x, y = images[i * copies:(i + 1) * copies].double(), labels[i].expand(copies)
        grads = torch.func.grad(lambda p, x=x, y=y: cross_entropy(model.apply(p, state, x, train=True)[0], y))(params64)
        flat = tree.flatten_paths(grads)
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in flat.values()))
        factor = min(1.0, clip / (norm + 1e-6))
        total = {k: factor * g + (total[k] if total else 0) for k, g in flat.items()}
    return {k: g / (batch or len(labels)) for k, g in total.items()}


def _assert_close(got: dict, want: dict, rtol=2e-5):
    """float32 against a reference: error relative to each tensor's scale (eps x a few hundred summed terms)."""
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-12)
        assert float((got[name].double() - want[name].double()).abs().max() / scale) < rtol, name


def _norms(model, params, state, images, labels):
    norms = []
    for i in range(len(labels)):
        x, y = images[i:i + 1], labels[i:i + 1]
        grads = torch.func.grad(lambda p, x=x, y=y: cross_entropy(model.apply(p, state, x, train=True)[0], y))(params)
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in tree.tree_leaves(grads))))
    return norms


def test_clipped_sum_equals_a_per_example_loop():
    model, params, state, images, labels = _setup()
    clip = sorted(_norms(model, params, state, images, labels))[6]  # half the examples are clipped, half not
    want = _loop_grads(model, params, state, images, labels, clip=clip, batch=20)
    for chunk in (None, 5):  # chunks of 5, 5 and 2 examples: the result does not depend on them
        got, _ = _dp_grads(model, params, state, images, labels, clip=clip, batch=20, chunk_size=chunk)
        _assert_close(got, want)


def test_clipped_sum_equals_opacus():
    import opacus  # the dp extra, in dev
    from opacus.optimizers import DPOptimizer

    model, params, state, images, labels = _setup(n=16)
    clip = sorted(_norms(model, params, state, images, labels))[8]
    got, _ = _dp_grads(model, params, state, images, labels, clip=clip)
    module = opacus.GradSampleModule(reference_module(SMALL, params, state).train())
    optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=16)
    torch.nn.functional.cross_entropy(module(images), labels).backward()
    optimizer.pre_step()  # clip, accumulate, add (zero) noise, divide by the expected batch: p.grad
    want = {name.removeprefix("_module."): p.grad for name, p in module.named_parameters()}
    _assert_close({torch_name(k): v for k, v in got.items()}, want)


def test_augmult_averages_copies_before_clipping():
    model, params, state, images, labels = _setup(n=15)
    labels = labels[:5]  # 5 examples of 3 augmented copies each, example-major
    want = _loop_grads(model, params, state, images, labels, clip=0.5, copies=3)
    got, _ = _dp_grads(model, params, state, images, labels, clip=0.5, copies=3, chunk_size=2)
    _assert_close(got, want)


def test_padding_contributes_exactly_nothing():
    model, params, state, images, labels = _setup(n=10)
    padded = torch.cat([labels[:6], torch.full((4,), privacy.PADDING)])
    computed, loss = _dp_grads(model, params, state, images, padded, clip=0.3, sigma=0.7, batch=8, chunk_size=4,
                               skip_padding=False)
    # Whatever the padded rows hold, even inf and nan, the same bits: they never reach the model.
    other = torch.cat([images[:6], torch.full((2, 3, 32, 32), float("inf")), torch.full((2, 3, 32, 32), float("nan"))])
    assert all(a.equal(b) for a, b in zip(computed.values(), _dp_grads(
        model, params, state, other, padded, clip=0.3, sigma=0.7, batch=8, chunk_size=4, skip_padding=False)[0]
        .values()))
    skipped, skipped_loss = _dp_grads(model, params, state, images, padded, clip=0.3, sigma=0.7, batch=8,
                                      chunk_size=4)  # the last chunk, all padding, is not computed: the same bits
    assert all(a.equal(b) for a, b in zip(computed.values(), skipped.values())) and loss.equal(skipped_loss)
    # And the same as the six real examples alone (same noise, same divisor), up to float32 summation order.
    real, real_loss = _dp_grads(model, params, state, images[:6], labels[:6], clip=0.3, sigma=0.7, batch=8,
                                chunk_size=4)
    _assert_close(computed, real)  # other chunk shapes: the convolutions may round differently
    torch.testing.assert_close(loss, real_loss)


def test_noise_has_the_right_standard_deviation():
    import scipy.stats as scipy_stats  # the datasets extra, in dev
    model, params, state, images, _ = _setup(n=4)
    nothing = torch.full((4,), privacy.PADDING)  # no real example: the result is the noise alone, / batch
    clip, sigma, batch = 2.0, 1.5, 8
    noise, _ = _dp_grads(model, params, state, images, nothing, clip=clip, sigma=sigma, batch=batch)
    values = torch.cat([v.flatten() for v in noise.values()]).double() * batch / (sigma * clip)
    n = len(values)  # ~14,000 draws of N(0, 1)
    assert abs(float(values.mean())) < 5 / math.sqrt(n)
    assert abs(float(values.std()) - 1) < 5 / math.sqrt(2 * n)
    assert scipy_stats.kstest(values.numpy(), "norm").pvalue > 1e-3
    again, _ = _dp_grads(model, params, state, images, nothing, clip=clip, sigma=sigma, batch=batch)
    other, _ = _dp_grads(model, params, state, images, nothing, clip=clip, sigma=sigma, batch=batch,
                         key=fnclass.key(6))
    assert all(a.equal(b) for a, b in zip(noise.values(), again.values()))  # a pure function of the step's key
    assert not any(a.equal(b) for a, b in zip(noise.values(), other.values()))
    leaves = [v.flatten()[:16] for v in noise.values() if v.numel() >= 16]
    assert all(not a.equal(b) for i, a in enumerate(leaves) for b in leaves[i + 1:])  # each tensor its own draws
    # A secret key changes the noise, and only the secret and the step's key determine it.
    secret = privacy.new_secret()
    hidden, _ = _dp_grads(model, params, state, images, nothing, clip=clip, sigma=sigma, batch=batch,
                          secret=secret)
    hidden_again, _ = _dp_grads(model, params, state, images, nothing, clip=clip, sigma=sigma, batch=batch,
                                secret=secret.clone())
    assert not any(a.equal(b) for a, b in zip(noise.values(), hidden.values()))
    assert all(a.equal(b) for a, b in zip(hidden.values(), hidden_again.values()))


def test_the_noise_reaches_eight_standard_deviations(monkeypatch):
    """The tails of the noise, where a coarse sampler cuts them: with every random word forced to its extreme, the
    DP gradient's noise is the largest normal its sampler can give. Float64 normals from 53 bits reach 8.2 standard
    deviations; the 24-bit ones stop at 5.4 (probability 7e-8 beyond), and a run using them fails here. (The
    largest word once gave an infinite normal: the uniform rounded to 1.)"""
    model, params, state, images, _ = _setup(n=4)
    nothing = torch.full((4,), privacy.PADDING)
    for word, sign in ((0, -1.0), (2 ** 32 - 1, 1.0)):
        monkeypatch.setattr(random, "bits",
                            lambda key, shape, word=word: torch.full(tuple(shape), word, dtype=torch.int64))
        noise, _ = _dp_grads(model, params, state, images, nothing, clip=1.0, sigma=1.0, batch=1)
        values = torch.cat([v.flatten() for v in noise.values()]) * sign
        assert float(values.min()) > 8.2 and float(values.max()) < 8.3, (float(values.min()), float(values.max()))


def test_poisson_sample_rate_order_and_overflow():
    n, rate = 1000, 0.1
    size = privacy.max_batch_size(n, rate)
    counts, taken = [], torch.zeros(n)
    for step in range(300):
        idx, valid, overflow = privacy.poisson_sample(random.fold_in(fnclass.key(0), step), n, rate, size)
        count = int(valid.sum())
        assert valid[:count].all() and not valid[count:].any()  # the sampled examples first
        assert len(set(idx.tolist())) == size and int(overflow) == 0
        counts.append(count)
        taken[idx[valid]] += 1
    mean = sum(counts) / len(counts)  # Binomial(1000, 0.1): mean 100, sd 9.5
    assert abs(mean - n * rate) < 5 * math.sqrt(n * rate * (1 - rate) / len(counts))
    assert abs(float(taken.mean()) / 300 - rate) < 0.01 and float(taken.min()) > 0
    # Too small a batch for the sample: a random `size` of the sampled are kept, the rest counted.
    idx, valid, overflow = privacy.poisson_sample(fnclass.key(1), n, rate, 50)
    chosen = random.bits(random.split(fnclass.key(1))[0], (n,)).double() < rate * 2.0 ** 32
    assert valid.all() and int(overflow) == int(chosen.sum()) - 50 > 0 and chosen[idx].all()


@pytest.mark.parametrize("n,rate", [(50000, 1024 / 50000), (1000, 0.1), (640, 64 / 640)])
def test_max_batch_size_is_the_binomial_quantile(n, rate):
    from scipy.stats import binom
    size = privacy.max_batch_size(n, rate)
    assert binom.sf(size, n, rate) <= privacy.OVERFLOW_TAIL < binom.sf(size - 1, n, rate)


def test_default_delta_is_below_one_over_n():
    assert [privacy.default_delta(n) for n in (50000, 10000, 640)] == [1e-5, 1e-5, 1e-3]


def _accountant_epsilon(sigma, rate, steps, delta, kind="rdp"):
    """Opacus' accountant stepped once per training step, as a training loop with Opacus does."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(kind)
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(delta=delta)


def test_plan_takes_the_noise_from_the_accountant_and_refuses_past_the_target():
    from opacus.accountants.utils import get_noise_multiplier

    config = load_config("dp").privacy
    resolved = privacy.plan(config, n=50000, batch_size=1024, steps=480)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=1024 / 50000, steps=480)
    assert resolved.noise_multiplier == sigma and resolved.delta == 1e-5
    assert privacy.epsilon(resolved, 480) == _accountant_epsilon(sigma, 1024 / 50000, 480, 1e-5) <= 8.0
    assert privacy.epsilon(resolved._replace(accountant="prv"), 100) == _accountant_epsilon(
        sigma, 1024 / 50000, 100, 1e-5, "prv")
    import dataclasses

    with pytest.raises(fnclass.errors.InputError, match="would spend epsilon .* > privacy.target_epsilon = 8.0"):
        privacy.plan(dataclasses.replace(config, noise_multiplier=sigma * 0.9), n=50000, batch_size=1024, steps=480)
    with pytest.raises(fnclass.errors.InputError, match="privacy.delta = 0.001 is not below 1 / 1000"):
        privacy.plan(dataclasses.replace(config, delta=1e-3), n=1000, batch_size=100, steps=10)


def test_missing_accountant_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)
    with pytest.raises(fnclass.errors.InputError, match=r"pip install 'fnclass\[dp\]'"):
        privacy._opacus()


@pytest.mark.parametrize("sets,message", [
    (["model.norm=batch"], "model.norm = 'batch' is not allowed under [privacy]: expected \"group\" (BatchNorm mixes"),
    (["data.mixup_alpha=0.2"], "data.mixup_alpha = 0.2 is not allowed under [privacy]"),
    (["train.precision=fp16"], "train.precision = 'fp16' is not allowed under [privacy]"),
    (["train.accumulate_steps=2"], "train.accumulate_steps = 2 is not allowed under [privacy]"),
    (["model.whiten=true", "model.widths=[32, 64, 128]"], "model.whiten = True is not allowed under [privacy]"),
])
def test_what_privacy_refuses_is_one_line(cifar_dir, tmp_path, sets, message):
    args = [arg for item in sets for arg in ("--set", item)]
    one_error_line(["train", "--config", "dp", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"), *args],
                   message)
    assert not (tmp_path / "run").exists()


def test_batch_norm_under_privacy_is_refused_in_python():
    with pytest.raises(ConfigError, match=r"BatchNorm mixes the examples of a batch"):
        load_config("dp", ["model.norm=batch"])
    with pytest.raises(ConfigError, match=r"privacy.max_grad_norm = 2.0 is not allowed: expected privacy.target_eps"):
        load_config(None, ["privacy.max_grad_norm=2"])  # a [privacy] section that would not be private
    resolve(load_config("dp").model)  # the shipped recipe itself resolves


RUN = ["model.widths=[8, 16, 16]", "model.stem_width=8", "model.norm_groups=4", "data.train_limit=600",
       "data.test_limit=200", "train.epochs=2", "train.batch_size=60", "train.log_every_steps=0",
       "checkpoint.every_steps=4", "privacy.chunk_size=32"]
CLI = [sys.executable, "-c", "from fnclass.cli import main; main()"]
# The same secret for two runs, so that a killed-and-resumed run can be compared with an uninterrupted one (never
# do this for runs you publish: two models trained with the same noise give it away in their difference).
SAME_SECRET = [sys.executable, "-c", "import fnclass.privacy as p, fnclass.core.random as r, tests.faults as f; "
               "p.new_secret = lambda: r.key(1234); f.main()"]  # with the kill FNCLASS_KILL_AT names


def _train(cifar_dir, out, *extra, env=None, cli=CLI):
    command = [*cli, "train", "--quiet", "--data-dir", str(cifar_dir), *extra]
    if "--resume" not in extra:
        command += ["--config", "dp", "--out", str(out), *[a for s in RUN for a in ("--set", s)]]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_a_private_run_reports_the_accountants_epsilon_and_resumes_exactly(cifar_dir, tmp_path):
    reference = _train(cifar_dir, tmp_path / "reference", cli=SAME_SECRET)
    assert reference.returncode == 0, reference.stderr
    summary = json.loads((tmp_path / "reference/summary.json").read_text())["privacy"]
    steps, rate, delta = 20, 60 / 600, 1e-3  # 600 images: delta 1e-3 < 1/600
    assert (summary["steps"], summary["sample_rate"], summary["delta"]) == (steps, rate, delta)
    assert summary["epsilon"] == _accountant_epsilon(summary["noise_multiplier"], rate, steps, delta) <= 8.0
    assert summary["epsilon"] > 7.9  # the noise was chosen to spend the target (to Opacus' 0.01 tolerance)
    assert summary["max_batch_size"] == privacy.max_batch_size(600, rate) and summary["poisson_overflow"] == 0
    rows = [json.loads(line) for line in (tmp_path / "reference/metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if row["kind"] == "epoch"]
    assert [row["epsilon"] for row in epochs] == [
        _accountant_epsilon(summary["noise_multiplier"], rate, s, delta) for s in (10, 20)]
    recorded = load_config(tmp_path / "reference/config.toml").privacy
    assert recorded.noise_multiplier == summary["noise_multiplier"] and recorded.target_epsilon == 8.0
    # Killed mid-epoch 2, resumed: the same batches, noise and accounting, bit for bit.
    out = tmp_path / "run"
    killed = _train(cifar_dir, out, env={"FNCLASS_KILL_AT": "step:13"}, cli=SAME_SECRET)
    assert killed.returncode == -signal.SIGKILL
    resumed = _train(cifar_dir, out, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    got = safetensors.torch.load_file(out / "checkpoints/last.safetensors")
    want = safetensors.torch.load_file(tmp_path / "reference/checkpoints/last.safetensors")
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    again = json.loads((out / "summary.json").read_text())
    assert again["privacy"] == summary and again["resumed_from_step"] == 12
    # The noise and the samples come from a secret the run keeps in privacy.key (0600), not from the seed that
    # checkpoints and exports record: the same config and seed again, with a fresh secret, give other weights.
    key_file = tmp_path / "reference/privacy.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    secret = json.loads(key_file.read_text())["key"]
    assert not any(t.numel() == 2 and t.tolist() == secret for t in want.values())
    assert str(secret[0]) not in (tmp_path / "reference/config.toml").read_text()
    other = _train(cifar_dir, tmp_path / "other")
    assert other.returncode == 0, other.stderr
    theirs = safetensors.torch.load_file(tmp_path / "other/checkpoints/last.safetensors")
    assert not theirs["params.head.weight"].equal(want["params.head.weight"])
    key_file.unlink()  # without its secret a private run cannot be resumed: one line, nothing changed
    (tmp_path / "reference/summary.json").unlink()  # as if killed in its final evaluation (a finished run has
    # nothing to resume: it shows its summary)
    stopped = _train(cifar_dir, out, "--resume", str(tmp_path / "reference"))
    assert stopped.returncode == 2 and "privacy.key is missing" in stopped.stderr, stopped.stderr
