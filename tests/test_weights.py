"""`--weights auto|ema|raw` on every command that loads a checkpoint's weights (issue 30): `grads`, `influence`
and `predict` take the EMA by default where a checkpoint has one, as `eval` and `export` do, say which in their
output, and each choice gives what a hand computation with those weights gives."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fnclass.cli import main
from fnclass.core.tree import tree_leaves
from fnclass.models import build_model
from fnclass.run.checkpoint import load_checkpoint
from tests.oneline import one_error_line
from tests.test_influence import first, naive_gradients, naive_tracin, train

CHOICES = [([], "ema"), (["--weights", "raw"], "raw"), (["--weights", "ema"], "ema")]  # (flag, weights used)


@pytest.fixture(scope="module")
def ema_run(cifar_dir, tmp_path_factory):
    """test_influence's run with an EMA of decay 0.9: its EMA weights sit far from its raw ones."""
    return train(cifar_dir, tmp_path_factory.mktemp("weights") / "run", sets=["train.ema_decay=0.9"])


def _invoke(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result


def test_the_ema_and_raw_weights_of_the_run_differ(ema_run):
    ema, raw = (load_checkpoint(ema_run / "checkpoints/last.safetensors", weights=w) for w in ("ema", "raw"))
    assert ema.weights == "ema" and raw.weights == "raw"
    flat = [torch.cat([leaf.flatten() for leaf in tree_leaves(c.params)]) for c in (ema, raw)]
    assert (flat[0] - flat[1]).abs().max() / flat[1].abs().max() > 1e-2  # every check below tells them apart


@pytest.mark.parametrize("flag, weights", CHOICES, ids=["auto", "raw", "ema"])
def test_grads_analyses_the_weights_asked_for(cifar_dir, ema_run, tmp_path, flag, weights):
    checkpoint = ema_run / "checkpoints/last.safetensors"
    result = _invoke(["grads", str(checkpoint), "--data-dir", str(cifar_dir), "--limit", "6", "--chunk-size", "3",
                      "--out", str(tmp_path), *flag])
    assert f"6 train examples (the rows the run trained on), {weights} weights" in result.output
    assert json.loads((tmp_path / "report.json").read_text())["weights"] == weights
    ckpt = load_checkpoint(checkpoint, weights=weights)
    model = build_model(dataclasses.replace(ckpt.config.model, attn_impl="math"))
    images, labels = first(cifar_dir, "train", 6)
    expected = naive_gradients(model, ckpt.params, ckpt.state, ckpt.preprocess(images), labels).norm(dim=1)
    rows = list(csv.DictReader(open(tmp_path / "per_example.csv")))
    got = torch.tensor([float(row["grad_norm"]) for row in rows])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    scored = _invoke(["grads", str(checkpoint), "--data-dir", str(cifar_dir), "--limit", "6", "--score", "el2n",
                      "--out", str(tmp_path / "scores"), *flag])
    assert f"({weights} weights)" in scored.output
    assert json.loads((tmp_path / "scores/scores.json").read_text())["weights"] == weights


@pytest.mark.parametrize("flag, weights", CHOICES, ids=["auto", "raw", "ema"])
def test_influence_sums_over_the_weights_asked_for(cifar_dir, ema_run, tmp_path, flag, weights):
    result = _invoke(["influence", str(ema_run), "--data-dir", str(cifar_dir), "--test-indices", "3,0",
                      "--train-limit", "8", "--chunk-size", "4", "--out", str(tmp_path), "--json", *flag])
    report = json.loads(result.stdout)
    assert report["weights"] == weights and {c["weights"] for c in report["checkpoints"]} == {weights}
    paths = sorted((ema_run / "checkpoints").glob("epoch-*.safetensors"))
    train_x, train_y = first(cifar_dir, "train", 8)
    test_x, test_y = first(cifar_dir, "test", 4)
    expected = naive_tracin(paths, train_x, train_y, test_x[[3, 0]], test_y[[3, 0]], weights=weights)
    other = naive_tracin(paths, train_x, train_y, test_x[[3, 0]], test_y[[3, 0]],
                         weights="raw" if weights == "ema" else "ema")
    scores = torch.from_numpy(np.load(tmp_path / "scores.npy", allow_pickle=False))
    assert (scores - expected).abs().max() / expected.abs().max() < 1e-5
    assert (other - expected).abs().max() / expected.abs().max() > 1e-2  # the other weights would fail it


def test_influence_prints_the_weights(cifar_dir, ema_run, tmp_path):
    result = _invoke(["influence", str(ema_run), "--data-dir", str(cifar_dir), "--test-indices", "0",
                      "--train-limit", "4", "--out", str(tmp_path)])
    assert result.output.startswith("tracin (ema weights): ")


@pytest.mark.parametrize("flag, weights", CHOICES, ids=["auto", "raw", "ema"])
def test_predict_runs_the_weights_asked_for(cifar_dir, ema_run, tmp_path, flag, weights):
    checkpoint = ema_run / "checkpoints/last.safetensors"
    images, _ = first(cifar_dir, "test", 4)
    paths = []
    for i, image in enumerate(images.numpy()):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    result = _invoke(["predict", str(checkpoint), *map(str, paths), "--top", "10", "--json", *flag])
    output = json.loads(result.stdout)
    assert output["weights"] == weights
    ckpt = load_checkpoint(checkpoint, weights=weights)
    expected = ckpt.calibrated_logits(images).softmax(-1)
    got = torch.tensor([[{g["class"]: g["probability"] for g in p["top"]}[name] for name in ckpt.classes]
                        for p in output["predictions"]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    table = _invoke(["predict", str(checkpoint), str(paths[0]), *flag])
    assert f"{weights} weights" in table.output


def test_a_choice_the_file_cannot_give_is_one_line(cifar_dir, ema_run, tmp_path):
    checkpoint = ema_run / "checkpoints/last.safetensors"
    image = tmp_path / "0.png"
    Image.fromarray(first(cifar_dir, "test", 1)[0][0].numpy()).save(image)
    _invoke(["export", str(checkpoint), "--out", str(tmp_path / "ema.safetensors")])  # auto: the EMA
    one_error_line(["predict", str(tmp_path / "ema.safetensors"), str(image), "--weights", "raw"],
                   "is an export of the ema weights, not the raw ones")
    one_error_line(["influence", str(ema_run), "--method", "metagrad", "--weights", "ema", "--test-indices", "0"],
                   "--method metagrad replays the run's training")
