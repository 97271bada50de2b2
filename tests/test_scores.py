"""Data-valuation scores (``fnclass grads --score``): EL2N against softmax minus one-hot by hand, GraNd against a loop
of single-example ``torch.func.grad`` calls, members averaged, kept_indices.txt read back by ``data.train_indices``."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fnclass import data
from fnclass.analysis import gradients as analysis
from fnclass.cli import main
from fnclass.config import load_config
from fnclass.core import tree
from fnclass.run.checkpoint import load_checkpoint
from fnclass.training.program import train
from tests.oneline import one_error_line

EPS = torch.finfo(torch.float32).eps
TINY = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8", "model.whiten=false",
        "model.dirac_init=false", "optim.whiten_bias_epochs=0", "optim.muon=false", "data.test_limit=100",
        "train.epochs=1", "train.log_every_steps=0", "train.channels_last=false", "train.tta=false",
        "checkpoint.keep=0"]
RUN = TINY + ["data.train_limit=256", "train.batch_size=64", "members.seeds=[0, 1]"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A data folder for conftest's untrained 3-class 16 x 16 tiny model: 12 random training images."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("synthetic")
    return data.write_dataset(folder, rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, 12),
                              rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), [0, 1, 2], ["cat", "dog", "emu"])


@pytest.fixture(scope="module")
def members_run(cifar_dir, tmp_path_factory):
    """Two members (seeds 0 and 1) of tiny trained for one epoch on real images: the stacked checkpoint, the result."""
    out = tmp_path_factory.mktemp("members") / "run"
    result = train(load_config("cpu", RUN), out, data_dir=str(cifar_dir))
    return out / "checkpoints/last.safetensors", result


def _score(checkpoint, folder, out, *args):
    """``fnclass grads CHECKPOINT --score ...`` with --json: the summary, and scores.csv's columns by name."""
    result = CliRunner().invoke(main, ["grads", str(checkpoint), "--data-dir", str(folder), "--out", str(out),
                                       "--device", "cpu", "--json", *args])
    assert result.exit_code == 0, result.output
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = {name: [float(row[name]) for row in rows] for name in rows[0]}
    return json.loads(result.stdout), columns


def _el2n_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax minus the one-hot label and its norm, written out example by example in float64."""
    scores = []
    for row, label in zip(logits.double(), labels.tolist()):
        error = row.exp() / row.exp().sum()
        error[label] -= 1
        scores.append(error.pow(2).sum().sqrt())
    return torch.stack(scores)


def _grand_by_loop(model, params, state, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One ``torch.func.grad`` call per example, the norm over every parameter in float64.

    oneDNN is off: its float32 convolution gradients for a batch of one can be 2% off (see tests/test_analysis.py).
    """
    def loss(p, image, label):
        logits, _ = model.apply(p, state, image[None], train=False)
        return torch.nn.functional.cross_entropy(logits, label[None])

    norms = []
    with torch.backends.mkldnn.flags(enabled=False):
        for image, label in zip(images, labels):
            grads = torch.func.grad(loss)(params, image, label)
            norms.append(sum(leaf.double().pow(2).sum() for leaf in tree.tree_leaves(grads)).sqrt())
    return torch.stack(norms)


def test_el2n_is_softmax_minus_one_hot(tiny_checkpoint, synthetic, tmp_path):
    """Against the checkpoint's own logits (its eval path, one batch), turned into EL2N by hand.

    The logits differ from the scores' by the reordering of float32 sums (another batch): eps x the longest
    reduction (16 x 16 positions) relative to their scale; EL2N moves at most by that much (its gradient in the
    logits has norm <= 1).
    """
    summary, columns = _score(tiny_checkpoint, synthetic, tmp_path / "s", "--score", "el2n", "--chunk-size", "5")
    ckpt = load_checkpoint(tiny_checkpoint)
    images, labels = data.load_split(synthetic, "train")
    logits = ckpt.logits(images)
    expected = _el2n_by_hand(logits, labels)
    tolerance = 16 * 16 * EPS * max(1.0, logits.abs().max().item())
    assert list(columns) == ["index", "label", "score"]  # one model: no member columns
    assert columns["index"] == list(range(12)) and columns["label"] == labels.tolist()
    assert (torch.tensor(columns["score"], dtype=torch.float64) - expected).abs().max() <= tolerance
    assert summary["method"] == "el2n" and summary["num_examples"] == 12 and summary["members"] == 1
    assert summary["mean_score"] == pytest.approx(expected.mean().item(), abs=tolerance)
    assert "softmax(logits) minus the one-hot label" in summary["definition"]
    assert json.loads((tmp_path / "s/scores.json").read_text()) == summary
    assert [row["index"] for row in summary["top"]] == torch.argsort(expected, descending=True)[:10].tolist()


def test_grand_is_the_norm_of_single_example_gradients(tiny_checkpoint, synthetic, tmp_path):
    """Against a loop of single-example ``torch.func.grad`` calls (chunks of 5 over 12 examples: a partial chunk).

    Tolerance: vmap's batched convolutions sum in another order than single examples do; eps x the longest
    reduction (16 x 16 positions), relative to each norm.
    """
    _, columns = _score(tiny_checkpoint, synthetic, tmp_path / "s", "--score", "grand", "--chunk-size", "5")
    ckpt = load_checkpoint(tiny_checkpoint)
    images, labels = data.load_split(synthetic, "train")
    expected = _grand_by_loop(ckpt.model, ckpt.params, ckpt.state, ckpt.preprocess(images), labels)
    relative = (torch.tensor(columns["score"], dtype=torch.float64) - expected).abs() / expected
    assert relative.max() <= 16 * 16 * EPS, relative.max()


@pytest.mark.parametrize("method", ["el2n", "grand"])
def test_a_stacked_checkpoints_score_is_the_mean_of_its_members(members_run, cifar_dir, tmp_path, method):
    """Each ``score_member<i>`` column against the reference of that member's trained weights (the training result,
    not the checkpoint), and ``score`` against their mean (the CSV's 9 digits hold float32 exactly: one rounding
    of the float32 mean apart)."""
    checkpoint, result = members_run
    summary, columns = _score(checkpoint, cifar_dir, tmp_path / "s", "--score", method, "--limit", "12",
                              "--chunk-size", "8")
    ckpt = load_checkpoint(checkpoint)
    images, labels = data.load_split(cifar_dir, "train", limit=12)
    x = ckpt.preprocess(images)
    assert list(columns) == ["index", "label", "score", "score_member0", "score_member1"]
    assert summary["members"] == 2 and [m["seed"] for m in summary["member_settings"]] == [0, 1]
    for member in range(2):
        params = tree.tree_index(result.train_state.params, member)
        state = tree.tree_index(result.train_state.state, member)
        if method == "el2n":
            logits, _ = ckpt.model.apply(params, state, x, train=False)
            expected = _el2n_by_hand(logits, labels)
            tolerance = 32 * 32 * EPS * max(1.0, logits.abs().max().item())  # as above, 32 x 32 positions
            error = (torch.tensor(columns[f"score_member{member}"], dtype=torch.float64) - expected).abs().max()
        else:
            expected = _grand_by_loop(ckpt.model, params, state, x, labels)
            tolerance = 32 * 32 * EPS
            error = ((torch.tensor(columns[f"score_member{member}"], dtype=torch.float64) - expected).abs()
                     / expected).max()
        assert error <= tolerance, (member, error)
    mean = (torch.tensor(columns["score_member0"], dtype=torch.float64)
            + torch.tensor(columns["score_member1"], dtype=torch.float64)) / 2
    assert torch.allclose(torch.tensor(columns["score"], dtype=torch.float64), mean, rtol=EPS, atol=0)
    assert summary["mean_score"] == pytest.approx(mean.mean().item(), rel=1e-6)


def test_kept_indices_are_the_highest_scores_sorted_and_train_indices_reads_them(members_run, cifar_dir, tmp_path):
    """ceil(0.3 x 40) = 12 indices, found again from scores.csv by sorting it; `data.train_indices` reads the file
    back, and a run on it trains on exactly those 12 images."""
    checkpoint, _ = members_run
    summary, columns = _score(checkpoint, cifar_dir, tmp_path / "s", "--score", "el2n", "--limit", "40",
                              "--keep-fraction", "0.3")
    ranked = sorted(range(40), key=lambda i: (-columns["score"][i], i))
    expected = sorted(ranked[:12])
    text = (tmp_path / "s/kept_indices.txt").read_text()
    assert text == "".join(f"{i}\n" for i in expected) and summary["kept"] == 12
    assert data.read_indices(tmp_path / "s/kept_indices.txt", 50_000).tolist() == expected
    assert data.read_indices(tmp_path / "s/scores.csv", 50_000).tolist() == list(range(40))  # its index column
    config = load_config("cpu", TINY + ["train.batch_size=12", f"data.train_indices={tmp_path / 's/kept_indices.txt'}"])
    ran = train(config, tmp_path / "retrained", data_dir=str(cifar_dir))
    assert ran.summary["train_images"] == 12 and ran.summary["steps"] == 1


def test_kept_indices_count_the_fraction_as_written():
    """0.07 x 100 is 7.000000000000001 in floats: 7 kept, not 8; of equal scores the lower index is kept."""
    scores = torch.arange(100, dtype=torch.float32) % 10  # ten each of 0..9: the 7 highest are 9s
    assert analysis.kept_indices(scores, 0.07).tolist() == [9, 19, 29, 39, 49, 59, 69]
    assert analysis.kept_indices(scores, 1.0).tolist() == list(range(100))
    assert analysis.kept_indices(scores, 1e-9).tolist() == [9]  # ceil: at least one
    assert math.ceil(0.07 * 100) == 8  # the float arithmetic the function avoids


@pytest.mark.parametrize("args, message", [
    (["--keep-fraction", "0.5"], "--keep-fraction 0.5 needs --score el2n or --score grand"),
    (["--score", "el2n", "--keep-fraction", "0"], "--keep-fraction 0: expected a fraction F with 0 < F <= 1"),
    (["--score", "grand", "--keep-fraction", "1.5"], "--keep-fraction 1.5: expected a fraction F with 0 < F <= 1"),
    (["--score", "el2n", "--keep-fraction", "nan"], "--keep-fraction nan: expected a fraction F"),
    (["--score", "el2n", "--keep-fraction", "-0.2"], "--keep-fraction -0.2: expected a fraction F"),
    (["--score", "el2n", "--keep-fraction", "0.5", "--split", "test"], "use --split train"),
    (["--score", "el2n", "--keep-fraction", "most"], "'most' is not a valid float"),
    (["--score", "el2m"], "'el2m' is not one of 'el2n', 'grand'"),
])
def test_bad_score_options_are_one_line(tiny_checkpoint, synthetic, tmp_path, args, message):
    out = tmp_path / "s"
    one_error_line(["grads", str(tiny_checkpoint), "--data-dir", str(synthetic), "--out", str(out), *args], message)
    assert not out.exists()
