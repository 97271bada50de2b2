"""The epoch loop's batches from the permuted source: mixup/CutMix composed on top of the other augmentations, from
the step's keys (derived by hand as the source documents)."""

import json

import torch
from click.testing import CliRunner

import fnclass
from fnclass.cli import main
from fnclass.config import load_config
from fnclass.core import random
from fnclass.core.augment import augment, mix_batch
from fnclass.data.batches import MIX, RunData
from fnclass.data.sources import PermutedSource
from fnclass.models import resolve_config
from fnclass.training.hooks import FiniteCheck
from fnclass.training.loop import EpochLoop
from fnclass.training.step import TrainState
from tests.test_loggers import read_back

MIXED = ["data.mixup_alpha=0.8", "data.cutmix_alpha=1.0", "data.mix_switch_prob=0.5"]


class _Recorder:
    """A stand-in step that records the batches and keys it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, train_state, batch, key):
        self.calls.append(batch)
        metrics = {"loss": torch.tensor(0.0), "correct": torch.tensor(0), "finite": torch.tensor(True)}
        return train_state._replace(step=train_state.step + 1), metrics


def test_mixed_batches_are_mix_batch_of_the_augmented_batch(tmp_path):
    config = resolve_config(load_config("cpu", ["model.num_classes=10", "train.batch_size=16",
                                                "train.log_every_steps=0", *MIXED]))
    pixels = torch.randint(0, 256, (64, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    mean_t, std_t = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    ds = RunData(pixels, labels, pixels, labels, (0.5,) * 3, (0.25,) * 3, mean_t, std_t, tuple("abcdefghij"), tmp_path)
    key, steps_per_epoch, epoch = fnclass.key(3), 4, 0
    recorder = _Recorder()
    source = PermutedSource(ds, config.data, key, 16)
    loop = EpochLoop(source, recorder, steps_per_epoch, 16, members=None,
                     finite=FiniteCheck(config, steps_per_epoch, tmp_path / "last.safetensors", []))
    loop(TrainState(torch.tensor(0), None, None, None, key), epoch, torch.device("cpu"))
    order = random.permutation(random.fold_in(random.split(key)[0], epoch), 64)  # the documented derivation
    flips = random.bernoulli(random.fold_in(random.split(key)[0], -1), 0.5, (64,))  # alternating flips, epoch 0
    for step, (images, targets) in enumerate(recorder.calls):
        # by hand: the step's augmentation key, the usual crop/flip, then the mix from fold_in(key, MIX)
        aug_key = random.split(random.fold_in(random.split(key)[1], step))[0]
        idx = order[step * 16:(step + 1) * 16]
        plain = augment(aug_key, (pixels[idx].permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25, config.data,
                        flip=flips[idx])
        expected = mix_batch(random.fold_in(aug_key, MIX), plain, labels[idx], num_classes=10, mixup_alpha=0.8,
                             cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5)
        torch.testing.assert_close(images, expected[0], rtol=0, atol=1e-6)
        assert torch.equal(targets, expected[1]) and targets.shape == (16, 10)
        assert not torch.equal(targets, torch.nn.functional.one_hot(labels[idx], 10).float())  # mixed


def test_a_mixed_run_with_tensorboard_logs_what_metrics_jsonl_holds(cifar_dir, tmp_path):
    out = tmp_path / "run"
    sets = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8", "data.train_limit=600",
            "data.test_limit=200", "train.epochs=2", "train.batch_size=100", "train.log_every_steps=2",
            "train.label_smoothing=0.1", *MIXED]
    result = CliRunner().invoke(main, ["train", "--data-dir", str(cifar_dir), "--out", str(out), "--quiet",
                                       "--logger", "tensorboard", *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars, _ = read_back(out / "tb")
    for row in rows:
        prefix = "train/" if row["kind"] == "step" else "epoch/"
        for name, value in row.items():
            if name not in ("kind", "step", "epoch") and isinstance(value, float):
                (step, logged), = [point for point in scalars[prefix + name] if point[0] == row["step"]]
                assert abs(logged - value) <= 2 ** -23 * abs(value), name  # TensorBoard stores float32
    assert {"epoch/test_accuracy", "epoch/images_per_second", "train/loss", "train/lr"} <= set(scalars)


def test_tensorboard_without_the_package_is_one_line_and_writes_nothing(cifar_dir, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ModuleNotFoundError(f"No module named '{name}'", name="tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data-dir", str(cifar_dir), "--out", str(out), "--logger",
                                       "tensorboard", "--set", "data.train_limit=600", "--set", "train.epochs=1",
                                       "--set", "train.batch_size=100"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'fnclass[tensorboard]'" in lines[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "tb").exists()
