"""The shipped configs train stably when a user shortens them: small real subsets, few epochs, several seeds.

Before the fix, cpu.toml diverged (nan by epoch 2) on every one of these except the 1,000-image runs: its head,
fed a max-pool of unnormalised features, took full-lr steps. A short run with a stable recipe has a finite loss
that falls from its first step and never climbs far above it.
"""

import json
import math

import pytest

from fnclass.config import load_config
from fnclass.training.program import train

QUICK = ["train.log_every_steps=1", "train.tta=false"]

CPU_RUNS = [
    # (Seeds 1 and 7 of this run were dropped to keep the suite in time: the unstable recipe diverged at every seed.)
    ["data.train_limit=2048", "train.epochs=3", "train.seed=0"],
    ["data.train_limit=2048", "train.epochs=11"],
    # 10,000 images: test_cpu_toml_on_10000_images_is_stable_and_beats_60_percent below.
    ["data.train_limit=5000", "train.epochs=3", "optim.warmup_epochs=1"],
    # The fewest steps worth checking: 4 and 8 (at the old batch of 256 these were 1,000-image runs; at batch 500 a
    # 1,000-image run is 2 or 4 steps, too few to tell a falling loss from noise).
    ["data.train_limit=2000", "train.epochs=2", "optim.warmup_epochs=1"],
    # Shorter than the warm-up: the schedule still comes down. (A 4-step run at the full peak lr, 2,000 images for
    # 1 epoch with the config's half-epoch warm-up, read 3.22, 3.22, 2.82, 3.46: four noisy steps, not a trend.)
    ["data.train_limit=2000", "train.epochs=1", "optim.warmup_epochs=2"],
    ["data.train_limit=1000", "train.epochs=4", "train.batch_size=128"],  # a smaller batch than the config's
]
# fast.toml's recipe at its own batch of 2,000 (uncompiled, fp32 on the CPU: its bf16 is the GPU's, and bf16 on a
# CPU without bf16 units is emulated and slow; tests/test_precision.py covers bf16 on the CPU); the tiny model keeps
# it to seconds.
FAST_RUNS = [["model.name=tiny", "train.compile=false", "train.precision=fp32", "data.train_limit=4000",
              "train.epochs=4", f"train.seed={seed}"] for seed in (0, 1)]


def _step_losses(config_path, overrides, cifar_dir, tmp_path, test_limit=500):
    overrides = [*overrides, *QUICK, f"data.test_limit={test_limit}"]
    summary = train(load_config(config_path, overrides), tmp_path / "run", data_dir=str(cifar_dir)).summary
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "step"], summary


def _assert_stable(losses):
    assert losses and all(math.isfinite(x) for x in losses), losses
    first, tail = losses[0], losses[-max(1, len(losses) // 4):]
    # Diverging runs climbed past 2x their first loss within 10 steps; a stable one may wobble by a fraction.
    assert max(losses) <= first + 0.5, f"the loss climbed from {first:.2f} to {max(losses):.2f}: {losses}"
    assert sum(tail) / len(tail) <= first - 0.3, f"the loss did not fall from {first:.2f}: {losses}"


@pytest.mark.slow
@pytest.mark.parametrize("overrides", CPU_RUNS, ids=lambda o: ",".join(x.split(".")[-1] for x in o))
def test_cpu_toml_trains_stably_on_small_subsets(overrides, cifar_dir, tmp_path):
    losses, summary = _step_losses("configs/cpu.toml", overrides, cifar_dir, tmp_path)
    _assert_stable(losses)
    assert math.isfinite(summary["test_loss"])
    if len(losses) >= 24:
        # Evaluation uses BatchNorm's running statistics, which need a few dozen steps to catch up with weights
        # moving at lr 0.3 (after 6 steps the test loss can read 15 while the train loss falls).
        assert summary["test_loss"] < 3.0, summary["test_loss"]


@pytest.mark.slow
def test_cpu_toml_on_10000_images_is_stable_and_beats_60_percent(cifar_dir, tmp_path):
    """cpu.toml at its own batch (500) and lr on a fifth of the training set for 4 epochs: 80 steps, stable, and a
    real accuracy. Seeds 0 and 1 reached 65.5% and 65.0% (2,000 test images: about 1 point of binomial noise), so
    60% leaves 5 points for seed and CPU."""
    overrides = ["data.train_limit=10000", "train.epochs=4"]
    losses, summary = _step_losses("configs/cpu.toml", overrides, cifar_dir, tmp_path, test_limit=2000)
    assert summary["steps"] == len(losses) == 4 * (10000 // 500)
    _assert_stable(losses)
    assert summary["test_loss"] < 3.0 and summary["test_accuracy"] > 0.60, summary


@pytest.mark.slow
@pytest.mark.parametrize("overrides", FAST_RUNS, ids=lambda o: o[-1])
def test_fast_toml_trains_stably_on_small_subsets(overrides, cifar_dir, tmp_path):
    losses, _ = _step_losses("configs/fast.toml", overrides, cifar_dir, tmp_path)
    _assert_stable(losses)


def test_a_batch_larger_than_the_subset_is_a_one_line_config_error(cifar_dir, tmp_path):
    from click.testing import CliRunner

    from fnclass.cli import main

    result = CliRunner().invoke(main, ["train", "--config", "configs/fast.toml", "--data-dir", str(cifar_dir),
                                       "--out", str(tmp_path / "run"), "--set", "data.train_limit=1000"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "train.batch_size = 2000" in result.stderr and "1000" in result.stderr


def test_a_run_shorter_than_its_warm_up_keeps_the_slope_and_comes_back_down():
    from fnclass.config import OptimConfig
    from fnclass.training.recipe import create_schedule

    config = OptimConfig(name="sgd", lr=0.3, schedule="one_cycle", warmup_epochs=2.0, final_lr_fraction=0.02)
    full = create_schedule(config, 8, 11)  # 16 warm-up steps of 88: the shipped shape
    short = create_schedule(config, 3, 1)  # 3 steps: the warm-up would take 6
    slope = (0.3 - 0.006) / 16
    assert float(full(16)) == pytest.approx(0.3) and float(full(88)) == pytest.approx(0.006)
    assert [float(short(s)) for s in range(4)] == pytest.approx([0.006, 0.006 + (0.3 - 0.006) / 6, 0.0305, 0.006])
    assert float(create_schedule(config, 8, 3)(12)) == pytest.approx(0.006 + 12 * slope)  # peak at the midpoint
