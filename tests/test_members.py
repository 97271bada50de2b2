"""K models at once under vmap: each member is the single run with its seed and swept values; the ensemble is the
mean of the members' logits; stacked runs resume bit for bit."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from fnclass import data
from fnclass.cli import main
from fnclass.config import load_config
from fnclass.core import random, tree
from fnclass.models import resolve_config
from fnclass.training import recipe
from fnclass.training import step as step_module
from fnclass.training.program import train
from tests.oneline import one_error_line

SMALL = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8"]
RUN = SMALL + ["data.train_limit=400", "data.test_limit=300", "train.epochs=2", "train.batch_size=100",
               "train.log_every_steps=2", "checkpoint.keep=0", "optim.lr=0.01"]


def test_stack_and_unstack_round_trip():
    trees = [{"a": torch.full((2, 3), float(i)), "b": (torch.tensor(i), torch.arange(4) + i)} for i in range(3)]
    stacked = tree.tree_stack(trees)
    assert stacked["a"].shape == (3, 2, 3) and stacked["b"][1].shape == (3, 4)
    back = tree.tree_unstack(stacked)
    assert len(back) == 3 and all(tree.tree_allclose(x, y, rtol=0, atol=0) for x, y in zip(back, trees))
    assert tree.tree_allclose(tree.tree_index(stacked, 2), trees[2], rtol=0, atol=0)
    with pytest.raises(ValueError):
        tree.tree_unstack({"a": torch.zeros(2), "b": torch.zeros(3)})


def _real_batches(count: int, size: int = 100):
    images = np.load(os.environ["FNCLASS_DATA"] + "/test_images.npy", mmap_mode="r")[:count * size]
    labels = np.load(os.environ["FNCLASS_DATA"] + "/test_labels.npy")[:count * size]
    mean, std = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1), torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    x = data.normalize(torch.from_numpy(images.copy()), mean, std)
    return [(x[i * size:(i + 1) * size], torch.from_numpy(labels[i * size:(i + 1) * size]).long())
            for i in range(count)]


def _worst(a, b) -> float:
    """The largest elementwise difference between two trees, relative to each leaf's largest magnitude."""
    return max(((x.double() - y.double()).abs().max() / y.double().abs().max().clamp(min=1e-30)).item()
               for x, y in zip(tree.tree_leaves(a), tree.tree_leaves(b)) if x.is_floating_point())


@pytest.mark.parametrize("sweep", [{}, {"optim.lr": [0.05, 0.2, 0.3]}, {"optim.weight_decay": [0.0, 2e-3, 1e-2]},
                                   {"train.label_smoothing": [0.0, 0.2, 0.4]}])
def test_a_vmapped_step_equals_each_members_single_step(cifar_dir, sweep):
    """One step of K = 3 members (seeds 0..2, and a swept value each) against the single step of each config.

    vmap reorders the convolutions' reductions (grouped over members), so the member may differ from the single
    step by rounding: at most 4x the distance between the float32 single step and the same step in float64
    (real images make that distance about 1e-5 relative: batch-norm biases' gradients cancel).
    """
    config = resolve_config(load_config("cpu", SMALL))
    model = recipe.create_model(config)
    key, values = (next(iter(sweep.items())) if sweep else (None, [None] * 3))
    hyper = {key: torch.tensor(values)} if key else {}

    def build(h):
        optimizer = recipe.create_optimizer(config.optim, model.param_labels, 4, 2, h)
        return step_module.make_train_step(model, recipe.create_loss(config, h), optimizer,
                                           gradient=functools.partial(step_module.mean_gradient, transformable=True))
    first = {k: v[0] for k, v in hyper.items()}
    states = [step_module.create_train_state(model, recipe.create_optimizer(config.optim, model.param_labels, 4, 2,
                                                                             first), random.key(seed))
              for seed in range(3)]
    (images, labels), = _real_batches(1)
    keys = torch.stack([random.key(10 + i) for i in range(3)])
    batch = (images.expand(3, -1, -1, -1, -1), labels.expand(3, -1))
    stacked, metrics = step_module.make_members_step(build)(tree.tree_stack(states), batch, keys, hyper)
    double = functools.partial(tree.tree_map, lambda v: v.double() if v.is_floating_point() else v)
    for i, value in enumerate(values):
        single_config = resolve_config(load_config("cpu", SMALL + ([f"{key}={value}"] if key else [])))
        optimizer = recipe.create_optimizer(single_config.optim, model.param_labels, 4, 2)
        single = step_module.make_train_step(model, recipe.create_loss(single_config), optimizer)
        start = step_module.create_train_state(model, optimizer, random.key(i))  # its own optimizer's state
        expected, single_metrics = single(start, (images, labels), keys[i])
        exact, _ = single(double(start), (images.double(), labels), keys[i])
        rounding = _worst(expected, exact)  # how far float32 itself lands from the float64 step
        member = tree.tree_index(stacked, i)
        for got, want in ((member.params, expected.params), (member.state, expected.state),
                          (member.params, exact.params)):
            assert _worst(got, want) <= 4 * rounding, (key, value, rounding)
        assert abs(float(metrics["loss"][i]) - float(single_metrics["loss"])) < 1e-5


def _recording(monkeypatch, calls: list):
    """Record every train-step call of the epoch loop into ``calls``: (inputs, outputs)."""
    from fnclass.training import loop as epoch

    monkeypatch.undo()  # one recorder at a time
    real = epoch.EpochLoop.__init__

    def init(self, source, train_step, *args, **kwargs):
        def recorded(*step_args):
            out = train_step(*step_args)
            calls.append((step_args, out))
            return out
        real(self, source, recorded, *args, **kwargs)
    monkeypatch.setattr(epoch.EpochLoop, "__init__", init)


def test_members_looped_on_the_cpu_end_bit_identical_to_their_single_runs(cifar_dir, tmp_path):
    """``members.strategy = "loop"`` (the CPU's default): K = 3 seeds equal three single runs bit for bit."""
    members = train(load_config("cpu", RUN + ["members.seeds=[0, 1, 2]", "members.strategy=loop"]),
                    tmp_path / "members", data_dir=str(cifar_dir))
    for i in range(3):
        single = train(load_config("cpu", RUN + [f"train.seed={i}"]), tmp_path / f"single{i}", data_dir=str(cifar_dir))
        got = tree.tree_index(members.train_state, i)
        assert all(a.equal(b) for a, b in zip(tree.tree_leaves(got), tree.tree_leaves(single.train_state)))
        assert members.summary["members"][i]["test_accuracy"] == single.summary["test_accuracy"]


def test_members_get_exactly_the_batches_keys_and_start_of_their_single_runs(cifar_dir, tmp_path, monkeypatch):
    """K = 3 seeds vmapped in one run against three single runs, step by step (real data, 8 steps).

    Every member's batch (augmented images, labels), model key and initial state equal the single run's bit for
    bit at every step; each member's update from its own input equals the single step's within float32
    rounding of the float64 step. Over whole runs the states then drift apart by rounding, amplified by
    training: the single run's channels-last oneDNN convolutions give gradients about 2e-4 (relative) from the
    float64 ones on real images, the vmapped grouped convolutions about 2e-6 (measured), and 8 steps amplify
    that to up to 0.25 in a BatchNorm bias (relative to its leaf's largest value). So runs are not compared
    at the end.
    """
    members_calls, single_calls = [], []
    _recording(monkeypatch, members_calls)
    train(load_config("cpu", RUN + ["members.seeds=[0, 1, 2]", "members.strategy=vmap"]), tmp_path / "members",
          data_dir=str(cifar_dir))
    singles = []
    for seed in range(3):
        single_calls = []
        _recording(monkeypatch, single_calls)
        train(load_config("cpu", RUN + [f"train.seed={seed}"]), tmp_path / f"single{seed}", data_dir=str(cifar_dir))
        singles.append(single_calls)
    assert len(members_calls) == 8 and all(len(calls) == 8 for calls in singles)
    config = resolve_config(load_config("cpu", RUN))
    model = recipe.create_model(config)
    single_step = step_module.make_train_step(model, recipe.create_loss(config), recipe.create_optimizer(
        config.optim, model.param_labels, 4, 2))
    double = functools.partial(tree.tree_map, lambda v: v.double() if v.is_floating_point() else v)
    for step, ((state, (images, labels), keys), (out, _)) in enumerate(members_calls):
        for i in range(3):
            (single_state, (single_images, single_labels), single_key), _ = singles[i][step]
            assert images[i].equal(single_images) and labels[i].equal(single_labels) and keys[i].equal(single_key)
            if step == 0:
                assert all(a.equal(b) for a, b in zip(tree.tree_leaves(tree.tree_index(state, i)),
                                                      tree.tree_leaves(single_state)))
            if step in (0, 5):  # the member's update from its own input, against the single step's
                start = tree.tree_index(state, i)
                expected, _ = single_step(start, (images[i], labels[i]), keys[i])
                exact, _ = single_step(double(start), (images[i].double(), labels[i]), keys[i])
                rounding = _worst(expected.params, exact.params)
                assert _worst(tree.tree_index(out, i).params, exact.params) <= 4 * rounding + 1e-6, (step, i)


def test_the_ensemble_is_the_mean_of_the_members_logits(cifar_dir, tmp_path):
    result = train(load_config("cpu", RUN + ["members.seeds=[0, 1, 2]", "members.strategy=vmap"]), tmp_path / "run",
                   data_dir=str(cifar_dir))
    model = recipe.create_model(resolve_config(load_config("cpu", RUN)))
    images, labels = data.load_split(cifar_dir, "test", limit=300)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    mean, std = summary_norm(tmp_path / "run")
    x = data.normalize(images, mean, std)
    logits = []
    for i in range(3):
        params, state = (tree.tree_index(t, i) for t in (result.train_state.params, result.train_state.state))
        logits.append(model.apply(params, state, x, train=False)[0])
        accuracy = (logits[-1].argmax(-1) == labels).float().mean().item()
        assert accuracy == pytest.approx(summary["members"][i]["test_accuracy"], abs=1e-6)
    ensemble = (torch.stack(logits).mean(0).argmax(-1) == labels).float().mean().item()
    assert summary["ensemble_test_accuracy"] == pytest.approx(ensemble, abs=1e-6)
    accuracies = [m["test_accuracy"] for m in summary["members"]]
    assert summary["test_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert summary["test_accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert summary["test_accuracy_min"] == min(accuracies) and summary["test_accuracy_max"] == max(accuracies)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert sorted({r["member"] for r in rows if r["kind"] == "member_epoch"}) == [0, 1, 2]
    assert (tmp_path / "run/plots/members.png").read_bytes()[:4] == b"\x89PNG"


def summary_norm(run_dir):
    with safetensors.safe_open(str(run_dir / "checkpoints/last.safetensors"), "pt") as handle:
        normalization = json.loads(handle.metadata()["normalization"])
    return (torch.tensor(normalization["mean"]).view(1, 3, 1, 1), torch.tensor(normalization["std"]).view(1, 3, 1, 1))


def test_a_sweep_through_the_cli_groups_its_table_and_summary(cifar_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data-dir", str(cifar_dir), "--out", str(out),
                                       *[a for s in RUN for a in ("--set", s)], "--seeds", "0-1",
                                       "--sweep", "optim.lr=0.01,0.05"])
    assert result.exit_code == 0, result.output
    assert "4 members:" in result.output and "optim.lr = 0.05:" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [(m["seed"], m["hyperparameters"]) for m in summary["members"]] == [
        (0, {"optim.lr": 0.01}), (0, {"optim.lr": 0.05}), (1, {"optim.lr": 0.01}), (1, {"optim.lr": 0.05})]
    assert [g["hyperparameters"] for g in summary["groups"]] == [{"optim.lr": 0.01}, {"optim.lr": 0.05}]
    assert load_config(out / "config.toml").members.lr == (0.01, 0.05)


@pytest.mark.parametrize("args,message", [
    (["--sweep", "model.widths=8,16"], "model.widths changes the model's shapes or the program"),
    (["--sweep", "train.batch_size=64,128"], "train.batch_size changes the model's shapes or the program"),
    (["--sweep", "optim.lrr=0.1"], "optim.lrr is not a config key"),
    (["--sweep", "optim.lr=fast,slow"], "must be numbers"),
    (["--seeds", "3-1"], "--seeds 3-1: expected seeds >= 0"),
    (["--set", "members.seeds=[0, 0, 1]"], "members.seeds = (0, 0, 1) is not allowed: expected seeds without repeats"),
])
def test_bad_member_options_are_one_line(cifar_dir, tmp_path, args, message):
    one_error_line(["train", "--config", "cpu", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"), *args],
                   message)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_a_killed_stacked_run_resumes_bit_exact(cifar_dir, tmp_path, strategy):
    sets = [a for s in RUN + ["checkpoint.every_steps=3", f"members.strategy={strategy}"] for a in ("--set", s)]
    command = [sys.executable, "-c", "from fnclass.cli import main; main()", "train", "--quiet", "--data-dir",
               str(cifar_dir), "--seeds", "0-2"]
    reference = subprocess.run([*command, "--out", str(tmp_path / "reference"), *sets], capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-m", "tests.faults", *command[3:], "--out", str(out), *sets],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FNCLASS_KILL_AT": "step:7"})
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run([*command[:3], "train", "--quiet", "--data-dir", str(cifar_dir), "--resume", str(out)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got = safetensors.torch.load_file(out / "checkpoints/last.safetensors")
    want = safetensors.torch.load_file(tmp_path / "reference/checkpoints/last.safetensors")
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    assert next(iter(want.values())).shape[0] == 3 or want["step"].shape == (3,)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "reference/metrics.jsonl").read_text().splitlines()]
    timing = {"seconds": 0, "images_per_second": 0}  # clocks differ between runs
    assert [{**r, **timing} for r in rows] == [{**r, **timing} for r in expected]
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 6  # every 3 steps: mid-epoch 2


# Trained enough to disagree: about 35-40% each, different predictions on about 45% of test images, so that one
# member standing in for the ensemble misses every check below by far more than its tolerance.
TRAINED = [s for s in RUN if not s.startswith(("data.train_limit", "train.epochs", "optim.lr"))] + [
    "data.train_limit=2000", "train.epochs=3", "optim.lr=0.2", "members.seeds=[0, 1]"]


@pytest.fixture(scope="module")
def members_run(cifar_dir, tmp_path_factory):
    """Two members trained until they disagree: the stacked checkpoint and the run's result."""
    out = tmp_path_factory.mktemp("members") / "run"
    result = train(load_config("cpu", TRAINED), out, data_dir=str(cifar_dir))
    return out / "checkpoints/last.safetensors", result


def _member_logits(result, images, mean, std):
    model = recipe.create_model(resolve_config(load_config("cpu", RUN)))
    x = data.normalize(images, mean, std)
    return [model.apply(tree.tree_index(result.train_state.params, i), tree.tree_index(result.train_state.state, i),
                        x, train=False)[0] for i in range(2)]


@pytest.mark.parametrize("fmt", ["safetensors", "pt2", "onnx"])
def test_exports_of_one_member_and_of_the_ensemble(members_run, cifar_dir, tmp_path, fmt):
    from fnclass.run.export import load_predictor

    if fmt == "onnx":
        from tests.needs import require_onnx
        require_onnx()
    checkpoint, result = members_run
    images, _ = data.load_split(cifar_dir, "test", limit=64)
    mean, std = summary_norm(checkpoint.parent.parent)
    members = _member_logits(result, images, mean, std)
    suffix = {"safetensors": ".safetensors", "pt2": ".pt2", "onnx": ".onnx"}[fmt]
    for flag, expected in ((["--member", "1"], members[1]), (["--ensemble"], (members[0] + members[1]) / 2)):
        out = tmp_path / f"{flag[0][2:]}{suffix}"
        run = CliRunner().invoke(main, ["export", str(checkpoint), "--format", fmt, "--out", str(out), *flag])
        assert run.exit_code == 0, run.output
        logits = load_predictor(out, trust_program=True).logits(images)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    one_error_line(["export", str(checkpoint), "--format", fmt, "--out", str(tmp_path / f"x{suffix}")],
                   "holds 2 members: choose --member I")
    one_error_line(["export", str(checkpoint), "--member", "2", "--out", str(tmp_path / f"y{suffix}")],
                   "member 2 does not exist")


def _figures(logits, labels, classes: int = 10) -> dict:
    """Accuracy, NLL, Brier score and per-class accuracy of ``logits``, by hand (not through fnclass's code)."""
    probs = logits.double().softmax(-1)
    correct = (logits.argmax(-1) == labels).double()
    one_hot = torch.nn.functional.one_hot(labels, classes).double()
    return {"accuracy": correct.mean().item(), "nll": -probs[torch.arange(len(labels)), labels].log().mean().item(),
            "brier": ((probs - one_hot) ** 2).sum(-1).mean().item(),
            **{f"class {k}": correct[labels == k].mean().item() for k in range(classes)}}


def _distance(a: dict, b: dict) -> float:
    return max(abs(a[key] - b[key]) for key in b)


def test_eval_and_predict_take_a_stacked_checkpoint_as_its_ensemble(members_run, cifar_dir, tmp_path):
    """`fnclass eval` and `predict` of a stacked checkpoint against the mean of the members' logits computed here,
    member by member with the model's apply; either member alone misses by at least 100x the tolerance."""
    checkpoint, result = members_run
    images, labels = data.load_split(cifar_dir, "test", limit=500)
    mean, std = summary_norm(checkpoint.parent.parent)
    members = _member_logits(result, images, mean, std)
    ensemble = _figures((members[0] + members[1]) / 2, labels)
    alone = [_figures(logits, labels) for logits in members]
    assert min(_distance(figures, ensemble) for figures in alone) > 1e-3  # the check below can see a lone member
    run = CliRunner().invoke(main, ["eval", str(checkpoint), "--data-dir", str(cifar_dir), "--limit", "500",
                                    "--json"])
    assert run.exit_code == 0, run.output
    output = json.loads(run.stdout)
    got = {"accuracy": output["accuracy"], "nll": output["nll"], "brier": output["brier"],
           **{f"class {k}": value for k, value in enumerate(output["per_class_accuracy"].values())}}
    assert _distance(got, ensemble) < 1e-5, (got, ensemble)
    for entry, figures in zip(output["members"], alone):  # and each member's own figures
        assert _distance({key: entry[key] for key in ("accuracy", "nll", "brier")},
                         {key: figures[key] for key in ("accuracy", "nll", "brier")}) < 1e-5
    from PIL import Image

    paths = []
    for i, image in enumerate(images[:40].numpy()):  # PNG: lossless, the same pixels
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    run = CliRunner().invoke(main, ["predict", str(checkpoint), *map(str, paths), "--top", "10", "--json"])
    assert run.exit_code == 0, run.output
    classes = (cifar_dir / "classes.txt").read_text().split()
    got = torch.tensor([[{guess["class"]: guess["probability"] for guess in p["top"]}[name] for name in classes]
                        for p in json.loads(run.stdout)["predictions"]], dtype=torch.float64)
    expected = ((members[0][:40] + members[1][:40]) / 2).double().softmax(-1)
    assert (got - expected).abs().max() < 1e-5
    for logits in members:  # a lone member's probabilities are far off
        assert (logits[:40].double().softmax(-1) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("sweep", [False, True])
def test_the_vmapped_members_step_traces_as_one_graph(sweep):
    """vmap under torch.compile: gradient, per-member optimizers (foreach-free under vmap) and swept values as
    tensors, one graph with no break (dynamo's explain; the GPU's compiled path uses the same trace)."""
    config = resolve_config(load_config("fast", ["model.name=tiny", "model.widths=[8, 16, 16]",
                                                 "optim.lookahead_every=5", "model.whiten=false",
                                                 "optim.whiten_bias_epochs=0"]))
    model = recipe.create_model(config)
    hyper = {"optim.lr": torch.tensor([0.1, 0.2]), "train.label_smoothing": torch.tensor([0.0, 0.2])} if sweep else {}

    def build(h):
        optimizer = recipe.create_optimizer(config.optim, model.param_labels, 10, 2, h)
        return step_module.make_train_step(model, recipe.create_loss(config, h), optimizer,
                                           gradient=functools.partial(step_module.mean_gradient, transformable=True))
    first = {k: v[0] for k, v in hyper.items()}
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, 10, 2, first)
    stacked = tree.tree_stack([step_module.create_train_state(model, optimizer, random.key(i)) for i in range(2)])
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 8, 3, 32, 32, generator=gen), torch.randint(0, 10, (2, 8), generator=gen))
    keys = torch.stack([random.key(5), random.key(6)])
    compiled = step_module.make_members_step(build, compile=True)
    explanation = torch._dynamo.explain(compiled._torchdynamo_orig_callable)(stacked, batch, keys, hyper)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
