"""bf16 on the CPU (issue 31): `train.precision = "bf16"` autocasts the train and evaluation steps on the CPU as on
CUDA, the state stays float32, and "auto" resolves from the CPU's bf16 units (injected here, so both branches run
on any CPU; the CI machine may lack the units)."""

from __future__ import annotations

import json

import numpy as np
import optree
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import fnclass
import fnclass.io
from fnclass import data
from fnclass.cli import main
from fnclass.config import load_config
from fnclass.core import losses, optim
from fnclass.core.tree import tree_leaves
from fnclass.io import DeviceError, resolve_precision
from fnclass.models import resolve_config
from fnclass.training import step as step_module

U_BF16 = 2.0 ** -9  # bf16's unit roundoff (8 significant bits, round to nearest)
U_FP32 = 2.0 ** -24
CPU = torch.device("cpu")
TINY = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8"]


def test_cpu_bf16_autocast_is_the_explicit_bf16_computation_within_its_rounding_bound():
    """Under the steps' autocast a matrix product and a convolution are the bf16 products of bf16-rounded
    operands, bit for bit; against float32 each output is off by at most the operands' and the output's rounding
    plus float32 accumulation over the reduction length K: (2u + u^2) sum|w||x| + u|y| + K u32 sum|w||x|."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(16, 512, generator=gen), torch.randn(64, 512, generator=gen), torch.randn(64, generator=gen)
    with step_module._autocast("cpu", "bf16"):
        y = F.linear(x, w, b)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()))
    reference = F.linear(x.double(), w.double(), b.double())
    magnitude = x.double().abs() @ w.double().abs().T + b.double().abs()
    bound = (2 * U_BF16 + U_BF16 ** 2) * magnitude + U_BF16 * reference.abs() + 512 * U_FP32 * magnitude
    assert ((y.double() - reference).abs() <= bound).all()
    assert (y.double() - reference).abs().max() > 1e3 * U_FP32 * magnitude.max()  # not float32: bf16 rounding
    images, filters = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    with step_module._autocast("cpu", "bf16"):
        out = F.conv2d(images, filters)
    assert out.dtype == torch.bfloat16 and torch.equal(out, F.conv2d(images.bfloat16(), filters.bfloat16()))
    with step_module._autocast("cpu", "fp32"):
        assert F.linear(x, w, b).dtype == torch.float32


def _spied(model, seen):
    def apply(*args, **kwargs):
        logits, state = model.apply(*args, **kwargs)
        seen.append(logits.dtype)
        return logits, state
    return model._replace(apply=apply)


@pytest.mark.parametrize("precision, inside", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_train_and_eval_steps_run_the_model_in_the_precision_asked_and_keep_float32_state(cifar_dir,
                                                                                             precision, inside):
    config = resolve_config(load_config(None, TINY))
    model = fnclass.build_model(config.model)
    optimizer = optim.chain(optim.trace(0.9), optim.scale(-0.05))
    state = step_module.create_train_state(model, optimizer, fnclass.key(0))
    raw, labels = data.load_split(cifar_dir, "train", limit=64)
    images = data.normalize(raw, torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1),
                            torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1))
    seen = []
    step = step_module.make_train_step(_spied(model, seen), losses.cross_entropy, optimizer, precision=precision,
                                       channels_last=True)
    new, metrics = step(state, (images, labels), fnclass.key(1))
    assert seen == [inside]
    for leaf in tree_leaves((new.params, new.state, new.opt_state)):  # params, BatchNorm statistics, momentum
        assert not leaf.is_floating_point() or leaf.dtype == torch.float32
    logits = step_module.make_eval_step(_spied(model, seen), precision=precision)(new.params, new.state, images)
    assert seen[-1] == inside and logits.dtype == torch.float32
    if precision == "bf16":  # within bf16's reach of float32, and not equal to it
        _, exact_metrics = step_module.make_train_step(model, losses.cross_entropy, optimizer)(
            state, (images, labels), fnclass.key(1))
        loss, exact = metrics["loss"].item(), exact_metrics["loss"].item()
        exact_logits = step_module.make_eval_step(model)(new.params, new.state, images)
        spread = ((logits - exact_logits).abs().max() / exact_logits.abs().max()).item()
        # Measured 2.8e-4 (loss) and 7.8e-3 (logits, 4u) on this model; every layer rounds its operands and output
        # (3u each, as above), compounded over the model's layers: bounded here at 16u = 3.1e-2 for both.
        assert 0 < abs(loss - exact) / exact < 16 * U_BF16 and 0 < spread < 16 * U_BF16


@pytest.fixture
def unpinned(monkeypatch):
    """auto as on a user's machine: without the suite's FNCLASS_AUTO_PRECISION=fp32 (tests/conftest.py)."""
    monkeypatch.delenv("FNCLASS_AUTO_PRECISION", raising=False)


def test_auto_resolves_from_the_cpus_units_and_never_fails(unpinned, monkeypatch):
    def broken():
        raise RuntimeError("no bf16 kernels")

    assert resolve_precision("auto", CPU, units=lambda: "AMX", probe=broken) == ("bf16", "auto: the CPU has AMX units")
    assert resolve_precision("auto", CPU, units=lambda: "AVX-512 BF16")[0] == "bf16"
    assert resolve_precision("auto", CPU, units=lambda: None, probe=broken) == (
        "fp32", "auto: the CPU has no AMX or AVX-512 BF16 units")
    assert resolve_precision("fp32", CPU, probe=broken) == ("fp32", "train.precision")
    assert resolve_precision("bf16", CPU) == ("bf16", "train.precision")  # this torch build runs it
    with pytest.raises(DeviceError, match='train.precision = "bf16": this torch build cannot run bf16 on the CPU '
                                          r'\(no bf16 kernels\); use "fp32"'):
        resolve_precision("bf16", CPU, probe=broken)
    with pytest.raises(DeviceError, match="--precision bf16: this torch build cannot run bf16 on the CPU "
                                          r"\(no bf16 kernels\); use fp32, or auto"):
        resolve_precision("bf16", CPU, probe=broken, name="--precision")
    monkeypatch.setenv("FNCLASS_AUTO_PRECISION", "fp32")
    assert resolve_precision("auto", CPU, units=lambda: "AMX") == ("fp32", "auto: FNCLASS_AUTO_PRECISION=fp32")
    assert resolve_precision("bf16", CPU) == ("bf16", "train.precision")  # pins auto only
    monkeypatch.setenv("FNCLASS_AUTO_PRECISION", "bf16")
    with pytest.raises(DeviceError, match="FNCLASS_AUTO_PRECISION=bf16: the only value is fp32"):
        resolve_precision("auto", CPU, units=lambda: "AMX")


def test_cpu_units_follow_torchs_capability_checks(monkeypatch):
    for amx, avx, expected in ((True, True, "AMX"), (False, True, "AVX-512 BF16"), (False, False, None)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx: avx)
        assert fnclass.io.cpu_bf16_units() == expected


QUICK = [*TINY, "data.train_limit=400", "data.test_limit=200", "train.epochs=1", "train.batch_size=100",
         "train.tta=false"]


def _train(cifar_dir, out, *args):
    return CliRunner().invoke(main, ["train", "--data-dir", str(cifar_dir), *args])


def test_auto_is_recorded_as_resolved_and_a_resume_keeps_it(cifar_dir, tmp_path, monkeypatch, unpinned):
    sets = [a for s in [*QUICK, "train.precision=auto"] for a in ("--set", s)]
    monkeypatch.setattr(fnclass.io, "cpu_bf16_units", lambda: "AMX")
    result = _train(cifar_dir, tmp_path / "run", "--out", str(tmp_path / "run"), *sets)
    assert result.exit_code == 0, result.output
    assert "precision bf16 (auto: the CPU has AMX units)" in result.output
    assert load_config(tmp_path / "run/config.toml").train.precision == "bf16"
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert (summary["precision"], summary["precision_reason"]) == ("bf16", "auto: the CPU has AMX units")
    monkeypatch.setattr(fnclass.io, "cpu_bf16_units", lambda: None)  # resumed where auto would pick fp32
    (tmp_path / "run/summary.json").unlink()  # as if killed in its final evaluation: a finished run trains nothing
    resumed = _train(cifar_dir, None, "--resume", str(tmp_path / "run"), *sets)  # the original command line
    assert resumed.exit_code == 0, resumed.output
    again = json.loads((tmp_path / "run/summary.json").read_text())
    assert (again["precision"], again["precision_reason"]) == ("bf16", "the run's recorded choice (config.toml)")
    fresh = _train(cifar_dir, tmp_path / "fresh", "--out", str(tmp_path / "fresh"), *sets)
    assert fresh.exit_code == 0 and "precision fp32 (auto: the CPU has no AMX or AVX-512 BF16 units)" in fresh.output
    # fnclass eval reproduces the bf16 run's own evaluation with --precision bf16 (float32 by default)
    checkpoint = str(tmp_path / "run/checkpoints/last.safetensors")
    evaluated = {p: json.loads(CliRunner().invoke(main, ["eval", checkpoint, "--data-dir", str(cifar_dir), "--limit",
                                                         "200", "--json", "--precision", p]).stdout)
                 for p in ("bf16", "fp32")}
    assert evaluated["bf16"]["precision"] == "bf16"
    assert evaluated["bf16"]["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    assert evaluated["fp32"]["loss"] != pytest.approx(summary["test_loss"], rel=1e-6)


def test_bf16_on_a_cpu_that_cannot_run_it_is_one_line(cifar_dir, tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("no bf16 kernels")

    monkeypatch.setattr(fnclass.io, "_cpu_bf16_probe", broken)
    result = _train(cifar_dir, tmp_path / "run", "--out", str(tmp_path / "run"),
                    *[a for s in [*QUICK, "train.precision=bf16"] for a in ("--set", s)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        'error: train.precision = "bf16": this torch build cannot run bf16 on the CPU (no bf16 kernels); use "fp32", '
        'or "auto" (which picks fp32 here)']
    assert not (tmp_path / "run").exists()


def _flat_rows(grads, n):
    return torch.stack([torch.cat([leaf[i].flatten() for leaf in tree_leaves(grads)]) for i in range(n)])


def test_per_example_gradients_in_bf16_are_the_loop_under_autocast_and_stay_float32(cifar_dir):
    """`--precision bf16` of the analysis commands (fnclass.io.in_precision): the vmapped per-example gradients are
    a one-example-at-a-time loop of torch.autograd.grad under the same autocast (measured 4.5e-6 apart, float32
    accumulation order), float32 leaves, and bf16's distance from the float32 gradients (measured 0.3-0.6%)."""
    import dataclasses

    from fnclass.analysis.gradients import per_example_grads
    from fnclass.io import autocast, in_precision

    config = resolve_config(load_config(None, TINY))
    model = fnclass.build_model(dataclasses.replace(config.model, attn_impl="math"))  # attention and LayerNorm too
    params, state = model.init(fnclass.key(0))
    raw, labels = data.load_split(cifar_dir, "train", limit=12)
    images = raw.permute(0, 3, 1, 2).float() / 255 - 0.5
    exact = _flat_rows(per_example_grads(model, params, state, images, labels, chunk_size=4), len(labels))
    grads = per_example_grads(in_precision(model, "bf16"), params, state, images, labels, chunk_size=4)
    assert all(leaf.dtype == torch.float32 for leaf in tree_leaves(grads))
    rows = []
    for i in range(len(labels)):
        leaves, treedef = optree.tree_flatten(params)
        live = [leaf.detach().requires_grad_() for leaf in leaves]
        with autocast("cpu", "bf16"):
            logits, _ = model.apply(optree.tree_unflatten(treedef, live), state, images[i:i + 1], train=False)
        loss = losses.per_example_cross_entropy(logits.float(), labels[i:i + 1])[0]
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, live)]))
    loop = torch.stack(rows)
    bf16 = _flat_rows(grads, len(labels))
    distance = lambda a, b: ((a - b).norm(dim=1) / b.norm(dim=1))
    assert distance(bf16, loop).max() < 1e-4
    assert 1e-4 < distance(bf16, exact).min() and distance(bf16, exact).max() < 16 * U_BF16


@pytest.fixture(scope="module")
def short_run(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("precision") / "run"
    sets = [a for s in [*QUICK, "checkpoint.every_epochs=1"] for a in ("--set", s)]
    result = _train(cifar_dir, out, "--out", str(out), *sets)
    assert result.exit_code == 0, result.output
    return out


def _json(*args):
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_grads_and_influence_compute_in_the_precision_asked(cifar_dir, short_run, tmp_path, monkeypatch, unpinned):
    checkpoint = str(short_run / "checkpoints/last.safetensors")
    common = ["--data-dir", str(cifar_dir), "--limit", "40", "--chunk-size", "20"]
    reports = {p: _json("grads", checkpoint, *common, "--precision", p, "--out", str(tmp_path / p))
               for p in ("fp32", "bf16")}
    assert (reports["fp32"]["precision"], reports["bf16"]["precision"]) == ("fp32", "bf16")
    norms = {p: torch.tensor([float(line.split(",")[4]) for line in
                              (tmp_path / p / "per_example.csv").read_text().splitlines()[1:]]) for p in reports}
    # over the split (a well-fitted example's tiny gradient is a difference of near-equal terms: measured up to 5%
    # alone, 0.66% over the 40; TracIn's score matrix 1.4%)
    spread = ((norms["bf16"] - norms["fp32"]).norm() / norms["fp32"].norm()).item()
    assert 0 < spread < 16 * U_BF16
    scores = _json("grads", checkpoint, *common, "--score", "el2n", "--precision", "bf16", "--out",
                   str(tmp_path / "el2n"))
    assert scores["precision"] == "bf16"
    monkeypatch.setattr(fnclass.io, "cpu_bf16_units", lambda: None)
    assert _json("grads", checkpoint, *common, "--precision", "auto", "--out", str(tmp_path / "a"))["precision"] == \
        "fp32"
    influence = ["influence", str(short_run), "--data-dir", str(cifar_dir), "--train-limit", "60", "--test-indices",
                 "0-3", "--chunk-size", "20"]
    traced = {p: _json(*influence, "--precision", p, "--out", str(tmp_path / f"tracin-{p}")) for p in ("fp32", "bf16")}
    assert traced["bf16"]["precision"] == "bf16"
    matrices = {p: torch.from_numpy(np.load(tmp_path / f"tracin-{p}/scores.npy")) for p in traced}
    relative = ((matrices["bf16"] - matrices["fp32"]).norm() / matrices["fp32"].norm()).item()
    assert 0 < relative < 16 * U_BF16
    for method in ("metagrad", "ekfac"):
        refused = CliRunner().invoke(main, ["influence", str(short_run), "--data-dir", str(cifar_dir), "--method",
                                            method, "--precision", "bf16", "--out", str(tmp_path / method)])
        assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.output
        assert "--precision" in refused.stderr and not (tmp_path / method).exists()
