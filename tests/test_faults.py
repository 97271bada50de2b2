"""Faults: a hard kill at each moment of a run, then --resume, ends bit-identical to an uninterrupted run.

Every run is a real `fnclass train` subprocess on a real CIFAR-10 subset, started through ``tests/faults.py``:
``FNCLASS_KILL_AT=POINT:N`` makes the process SIGKILL itself on its N-th arrival at a moment that module wraps
(after a step, before an evaluation batch, halfway through writing a file); fnclass itself holds no test hook. One
more run is killed from outside at a moment chosen by the clock. The run: 3 epochs of 6 steps, ``last`` saved every
4 steps and at every epoch end, 2 kept copies.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import optree
import pytest
import safetensors.torch

pytestmark = pytest.mark.slow

QUICK = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8", "data.train_limit=600",
         "data.test_limit=200", "train.epochs=3", "train.batch_size=100", "train.log_every_steps=2",
         "checkpoint.every_steps=4", "checkpoint.keep=2", "train.tta=true",
         "train.eval_every=1"]  # every epoch evaluated (cpu.toml evaluates the last only): kill points inside each
CLI = [sys.executable, "-m", "tests.faults"]  # the fnclass CLI, with the kill FNCLASS_KILL_AT names


def _train(cifar_dir, out, *extra, kill_at=None, sets=QUICK):
    env = {**os.environ, "FNCLASS_KILL_AT": kill_at or ""}
    command = [*CLI, "train", "--quiet", "--data-dir", str(cifar_dir), *extra]
    if "--resume" not in extra:
        command += ["--out", str(out), *[arg for item in sets for arg in ("--set", item)]]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _tensors(path):
    return safetensors.torch.load_file(path)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(path, reference):
    got, want = _tensors(path), _tensors(reference)
    assert got.keys() == want.keys()
    for name in want:  # bitwise: params, BatchNorm statistics, optimizer state, step and key
        assert got[name].dtype == want[name].dtype and got[name].equal(want[name]), name


@pytest.fixture(scope="module")
def reference(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "reference"
    result = _train(cifar_dir, out)
    assert result.returncode == 0, result.stderr
    return out


# point, and the step the resumed run continues from (the last checkpoint complete at the kill)
KILLS = [
    ("step:5", 4),  # mid-step of epoch 1: the every-4-steps checkpoint
    ("step:15", 12),  # mid-epoch 3
    ("eval:2", 12),  # evaluating epoch 2, after the every-4-steps checkpoint of its last step
    ("write:last.safetensors:3", 6),  # halfway through writing step 8's checkpoint: step 6's stays
    ("write:best.safetensors:2", 12),  # between last (step 12, a new best) and its best copy
    ("write:metrics.jsonl:4", 4),  # halfway through epoch 1's row, before its checkpoint
    ("write:summary.json:1", 18),  # writing summary.json after the last epoch
]


@pytest.mark.parametrize("point,resumed_step", KILLS, ids=[point for point, _ in KILLS])
def test_a_hard_kill_then_resume_ends_bit_identical(cifar_dir, reference, tmp_path, point, resumed_step):
    out = tmp_path / "run"
    killed = _train(cifar_dir, out, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "summary.json").exists()
    if point.startswith("write:metrics"):  # killed halfway through a line
        last_line = (out / "metrics.jsonl").read_text().splitlines()[-1]
        with pytest.raises(json.JSONDecodeError):
            json.loads(last_line)
    elif point.startswith("write:"):  # killed halfway through a temporary file; the target is untouched
        assert list(out.glob("**/.*.tmp"))
    resumed = _train(cifar_dir, out, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == resumed_step
    assert_same_tensors(out / "checkpoints/last.safetensors", reference / "checkpoints/last.safetensors")
    assert_same_tensors(out / "checkpoints/best.safetensors", reference / "checkpoints/best.safetensors")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        p.name for p in (reference / "checkpoints").iterdir())  # kept copies pruned, no temporary left
    rows, want = _rows(out), _rows(reference)
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in want]  # each exactly once
    for got, expected in zip(rows, want):  # identical, the time an epoch took apart
        timing = {"seconds": 0, "images_per_second": 0}  # clocks differ between runs; everything else may not
        assert {**got, **timing} == {**expected, **timing}
    summary, reference_summary = (json.loads((o / "summary.json").read_text()) for o in (out, reference))
    assert summary["test_accuracy"] == reference_summary["test_accuracy"]
    assert summary["test_accuracy_tta"] == reference_summary["test_accuracy_tta"]


def test_a_kill_from_outside_at_a_moment_set_by_the_clock(cifar_dir, tmp_path):
    """SIGKILL sent by another process once the run is under way; resume ends as the run uninterrupted."""
    sets = [s for s in QUICK if not s.startswith(("data.train_limit", "train.epochs"))]
    sets += ["data.train_limit=3000", "train.epochs=2"]  # 30 steps an epoch: long enough to land mid-run
    reference = tmp_path / "reference"
    assert _train(cifar_dir, reference, sets=sets).returncode == 0
    out = tmp_path / "run"
    command = [*CLI, "train", "--quiet", "--data-dir", str(cifar_dir), "--out", str(out),
               *[arg for item in sets for arg in ("--set", item)]]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints/last.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # somewhere in the next steps, evaluation or writes
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # it had not finished
    resumed = _train(cifar_dir, out, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_tensors(out / "checkpoints/last.safetensors", reference / "checkpoints/last.safetensors")
    assert [(r["kind"], r["step"]) for r in _rows(out)] == [(r["kind"], r["step"]) for r in _rows(reference)]


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(cifar_dir, reference, tmp_path):
    out = tmp_path / "run"
    killed = _train(cifar_dir, out, kill_at="step:17")  # last = step 16 (every 4 steps); kept: steps 6 and 12
    assert killed.returncode == -signal.SIGKILL
    last = out / "checkpoints/last.safetensors"
    data = bytearray(last.read_bytes())
    data[-100] ^= 0x04  # one flipped bit in the tensor bytes
    last.write_bytes(data)
    resumed = _train(cifar_dir, out, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "passed over last.safetensors" in resumed.stderr and "checksum mismatch" in resumed.stderr
    assert "resuming from step-00000012.safetensors (step 12)" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 12 and summary["resumed_from_checkpoint"] == "step-00000012.safetensors"
    assert_same_tensors(last, reference / "checkpoints/last.safetensors")


NAN_RUN = [s for s in QUICK if not s.startswith("train.tta")] + ["train.epochs=2"]


def _poisoned_train(cifar_dir, out, monkeypatch, *, policy, at_step, calls=None, sets=NAN_RUN):
    """Train in this process with the batch of update ``at_step`` (1-based) made nan; record that step's states."""
    from fnclass.config import load_config
    from fnclass.training import program as training
    from fnclass.training import recipe

    real = recipe.create_train_step

    def make_poisoned(*args, **kwargs):
        step = real(*args, **kwargs)

        def poisoned(train_state, batch, key):
            images, labels = batch
            if int(train_state.step) == at_step - 1:
                images = images.clone()
                images[0, 0, 0, 0] = float("nan")
            new_state, metrics = step(train_state, (images, labels), key)
            if calls is not None and int(train_state.step) == at_step - 1:
                calls.append((train_state, new_state))
            return new_state, metrics
        return poisoned

    monkeypatch.setattr(recipe, "create_train_step", make_poisoned)
    config = load_config("cpu", sets + [f"train.nan_policy={policy}"])  # the CLI's default config on a CPU
    return training.train(config, out, data_dir=str(cifar_dir))


@pytest.mark.parametrize("log_every,bad_step,saved_step", [(2, 9, 8), (0, 7, 6)])
def test_a_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(cifar_dir, tmp_path, monkeypatch,
                                                                                 log_every, bad_step, saved_step):
    """Found at the next logging step (step 10) or, logging off, at the next checkpoint save (step 8)."""
    from fnclass.training.program import TrainingDiverged

    sets, out = NAN_RUN + [f"train.log_every_steps={log_every}"], tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=f"nan/inf at step {bad_step} \\(epoch 2\\)") as info:
        _poisoned_train(cifar_dir, out, monkeypatch, policy="stop", at_step=bad_step, sets=sets)
    assert info.value.step == bad_step and "last.safetensors holds the last good state" in str(info.value)
    assert int(_tensors(out / "checkpoints/last.safetensors")["step"]) == saved_step  # the nan state never saved
    reference = tmp_path / "reference"
    assert _train(cifar_dir, reference, kill_at=f"step:{saved_step + 1}", sets=sets).returncode == -signal.SIGKILL
    assert_same_tensors(out / "checkpoints/last.safetensors", reference / "checkpoints/last.safetensors")
    assert [r["step"] for r in _rows(out)] == [r["step"] for r in _rows(reference)]  # nothing after the nan


def test_a_nan_with_policy_skip_skips_that_update_and_counts_it(cifar_dir, tmp_path, monkeypatch):
    out, calls = tmp_path / "run", []
    result = _poisoned_train(cifar_dir, out, monkeypatch, policy="skip", at_step=9, calls=calls)
    (before, after), = calls
    assert int(after.step) == 9
    for name in ("params", "state", "opt_state"):  # unchanged by the skipped update, bit for bit
        for x, y in zip(*(optree.tree_leaves(getattr(s, name)) for s in (before, after))):
            assert x.equal(y), name
    assert result.summary["skipped_steps"] == 1 and result.summary["nan_policy"] == "skip"
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    epochs = [r for r in _rows(out) if r["kind"] == "epoch"]
    assert [r["skipped_steps"] for r in epochs] == [0, 1]
    assert all(math.isfinite(r["train_loss"]) for r in epochs)  # the skipped step's loss is left out
    steps = {r["step"]: r for r in _rows(out) if r["kind"] == "step"}
    assert steps[8]["skipped_steps"] == 0 and steps[10]["skipped_steps"] == 1


def test_weights_whose_evaluation_overflows_end_the_run_with_exit_3_and_no_best(cifar_dir, tmp_path):
    """A typo'd learning rate (1e8): the steps' losses, gradients and weights stay finite (the weights reach about
    2e8) but the evaluation's logits do not. The run ends with exit 3 and one error line naming the evaluation,
    before any checkpoint: no ``best`` chosen from a nan evaluation, no epoch row, no summary."""
    out = tmp_path / "run"
    sets = ["data.train_limit=1000", "data.test_limit=200", "train.epochs=1", "optim.lr=1e8"]
    result = subprocess.run([*CLI, "train", "--config", "cpu", "--data-dir", str(cifar_dir), "--out", str(out),
                             *[arg for item in sets for arg in ("--set", item)]], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: training diverged: evaluating epoch 1 (step 2) on the test split gave nan/inf (the weights: 200 of "
        "200 images with nan/inf logits, loss nan)"), result.stderr
    assert "no checkpoint was written before it" in errors[0] and "nan_policy" not in errors[0]
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()
    assert not [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line] if (
        out / "metrics.jsonl").exists() else True


def test_a_nan_evaluation_of_one_members_ema_stops_the_run_and_keeps_the_last_good_best(cifar_dir, tmp_path,
                                                                                           monkeypatch):
    """Every evaluation is checked, the EMA weights' and each member's included: member 1's EMA weights made to
    give nan logits in epoch 2's evaluation (injected into its result) end the run naming them, and best/last
    stay epoch 1's."""
    from fnclass.config import load_config
    from fnclass.run.checkpoint import load_checkpoint
    from fnclass.training import program
    from fnclass.training.hooks import TrainingDiverged

    real = program.evaluate

    def evaluate(setup, prog, train_state, split, *, final):
        evaluation = real(setup, prog, train_state, split, final=final)
        if int(train_state.step.reshape(-1)[0]) > 6:  # epoch 2
            evaluation["ema_"]["members"][1]["nonfinite_logits"] = 7
        return evaluation

    monkeypatch.setattr(program, "evaluate", evaluate)
    out = tmp_path / "run"
    sets = [s for s in NAN_RUN if not s.startswith("checkpoint.every_steps")]
    config = load_config("cpu", sets + ["members.seeds=[0, 1]", "train.ema_decay=0.9"])
    with pytest.raises(TrainingDiverged) as info:
        program.train(config, out, data_dir=str(cifar_dir))
    assert str(info.value).startswith("training diverged: evaluating epoch 2 (step 12) on the test split gave "
                                      "nan/inf (the EMA weights, member 1: 7 of 200 images with nan/inf logits")
    assert f"{out / 'checkpoints/last.safetensors'} holds the last good state" in str(info.value)
    assert [r["epoch"] for r in _rows(out) if r["kind"] == "epoch"] == [1]
    for name in ("last", "best"):
        assert load_checkpoint(out / f"checkpoints/{name}.safetensors").step == 6
