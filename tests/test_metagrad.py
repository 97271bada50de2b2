"""``fnclass influence --method metagrad``: the replay is the recorded run bit for bit, and the reverse pass through it
is the derivative of the real training function (central finite differences of the whole run in float64, each
training example's weight perturbed); runs that cannot be replayed exactly are one line."""

from __future__ import annotations

import json

import pytest
import torch

from fnclass.config import load_config
from fnclass.core import layers
from fnclass.core.losses import margin
from fnclass.errors import InputError
from fnclass.training import metagrad
from fnclass.training.program import train
from tests.oneline import one_error_line

# A BatchNorm model with attention and a one-cycle schedule: 2 epochs of 4 steps.
SMALL = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8", "model.whiten=false",
         "model.dirac_init=false", "optim.whiten_bias_epochs=0", "optim.muon=false", "data.test_limit=200",
         "train.epochs=2", "train.batch_size=32", "train.log_every_steps=0", "train.channels_last=false",
         "train.tta=false", "data.train_limit=128"]
TESTS = [0, 1]


@pytest.fixture(scope="module")
def run(cifar_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("metagrad") / "run"
    train(load_config("cpu", SMALL), path, data_dir=str(cifar_dir))
    return path


def _margins_after_replay(replay, weights, images, labels):
    """The test margins at the end of the replayed run with loss weights ``weights`` (the library's own step)."""
    state = replay.start
    with torch.no_grad():
        for t in range(replay.steps):
            state = metagrad._advance(replay._replace(weights=weights), state, t)
        return margin(replay.model.apply(state.params, state.state, images, train=False)[0], labels)


def test_the_reverse_pass_is_the_derivative_of_the_whole_run(run, cifar_dir):
    """In float32 the replay ends on the run's own last checkpoint exactly (so it is the run fnclass train made).
    In float64, d margin / d w_i from the reverse pass equals the central difference (eps 1e-7) of the whole
    replayed run, for examples drawn in the first and in the last step. Tolerance: float64 rounding (1e-16) over
    8 steps, amplified by the run's sensitivity and divided by eps, stays below 1e-6; the difference's truncation
    error is eps^2 times the third derivative. The rugged larger-eps differences of such a run (its max-pools and
    large steps switch at eps 1e-3) are why the check is made at 1e-7, in float64."""
    # States kept every 3rd step of 8: the reverse pass recomputes the others, across an uneven last segment.
    exact = metagrad.metagradients(run, TESTS, data_dir=str(cifar_dir), dtype=torch.float64, segment=3)
    assert exact.scores.shape == (2, 128) and exact.steps == 8 and exact.scores.dtype == torch.float64

    with layers.differentiable_statistics():
        replay = metagrad.in_dtype(metagrad.replay_of(run, data_dir=str(cifar_dir)), torch.float64)
        images, labels = metagrad._test_split(replay, TESTS)
        first = replay.source.indices(0, 0)[:2].tolist()
        last = replay.source.indices(1, 3)[:1].tolist()
        eps = 1e-7
        for i in first + last:
            up, down = replay.weights.clone(), replay.weights.clone()
            up[i] += eps
            down[i] -= eps
            difference = (_margins_after_replay(replay, up, images, labels)
                          - _margins_after_replay(replay, down, images, labels)) / (2 * eps)
            torch.testing.assert_close(exact.scores[:, i], difference, rtol=1e-4, atol=1e-6)
    assert exact.scores.abs().max() > 0.05  # the examples matter: the comparison can fail


def test_the_cli_replays_the_run_exactly_and_writes_the_attribution(run, cifar_dir, tmp_path):
    from click.testing import CliRunner

    from fnclass.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["influence", str(run), "--method", "metagrad", "--test-indices", "0-1",
                                       "--data-dir", str(cifar_dir), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    import numpy as np

    scores = np.load(out / "scores.npy", allow_pickle=False)
    assert report["method"] == "metagrad" and report["replay_error"] == 0.0 and report["steps"] == 8
    assert scores.shape == (2, 128) and np.load(out / "train_indices.npy").tolist() == list(range(128))
    best = report["tests"][0]["proponents"][0]
    assert best["index"] == int(scores[0].argmax()) and best["score"] == pytest.approx(float(scores[0].max()))


def test_a_replay_that_does_not_end_on_the_checkpoint_is_refused(run, cifar_dir, monkeypatch):
    monkeypatch.setattr(metagrad, "REPLAY_TOLERANCE", -1.0)
    with pytest.raises(InputError, match="is not the recorded run"):
        metagrad.metagradients(run, TESTS, data_dir=str(cifar_dir))


def test_runs_it_cannot_replay_are_one_line(run, cifar_dir, tmp_path):
    private = tmp_path / "private"
    train(load_config("dp", ["data.train_limit=256", "data.test_limit=100", "train.epochs=1",
                             "train.batch_size=64", "model.widths=[8, 16, 16]", "model.stem_width=8",
                             "model.norm_groups=4"]), private, data_dir=str(cifar_dir))
    one_error_line(["influence", str(private), "--method", "metagrad", "--data-dir", str(cifar_dir), "--out",
                    str(tmp_path / "out")], "cannot replay", "private run")
    one_error_line(["influence", str(tmp_path / "missing"), "--method", "metagrad", "--out", str(tmp_path / "o")],
                   "has no checkpoints/last.safetensors")
    one_error_line(["influence", str(run), "--method", "metagrad", "--data-dir", str(cifar_dir), "--max-memory",
                    "100KB", "--out", str(tmp_path / "out")], "over --max-memory", "raise --max-memory")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
