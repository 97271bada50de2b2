"""Corruption folders (`fnclass data prepare cifar10-c`) and `fnclass eval --corruptions`, on real images."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fnclass
from fnclass.analysis.robustness import evaluate_corruptions
from fnclass.cli import main
from fnclass.config import load_config
from fnclass.core.optim import sgd
from fnclass.data import DataError, load_classes, load_split
from fnclass.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt_block, prepare_corruptions, read_corruption_set
from fnclass.models import resolve_config
from fnclass.run.checkpoint import load_checkpoint, save_checkpoint
from fnclass.training.calibration import calibration_metrics
from fnclass.training.step import create_train_state

COUNT = 6


@pytest.fixture(scope="module")
def corrupted(cifar_dir, tmp_path_factory):
    """All 15 corruptions of the first 6 real test images."""
    return prepare_corruptions(cifar_dir, tmp_path_factory.mktemp("c") / "cifar10-c", images=COUNT, seed=3)


def test_the_folder_holds_every_corruption_and_severity_of_the_test_images(corrupted, cifar_dir):
    corruption_set = read_corruption_set(corrupted)
    clean, labels = load_split(cifar_dir, "test", limit=COUNT)
    assert corruption_set.corruptions == CORRUPTIONS and corruption_set.images == COUNT
    assert np.array_equal(corruption_set.labels, labels.numpy())
    assert np.array_equal(np.load(corrupted / "labels.npy"), np.tile(labels.numpy(), 5))
    assert corruption_set.classes == load_classes(cifar_dir)
    manifest = json.loads((corrupted / "manifest.json").read_text())
    assert manifest["seed"] == 3 and set(manifest["sha256"]) == {f"{n}.npy" for n in CORRUPTIONS} | {"labels.npy"}
    for name in CORRUPTIONS:
        images = corruption_set.load(name).astype(np.float64)
        change = [np.abs(images[(s - 1) * COUNT:s * COUNT] - clean.numpy()).mean() for s in SEVERITIES]
        # every corruption changes the images, and severity 5 more than severity 1
        assert change[0] > 0.5 and change[4] > change[0], (name, change)


def test_each_image_is_corrupted_the_same_whatever_the_batch_and_worker_count(corrupted, cifar_dir, tmp_path):
    clean, _ = load_split(cifar_dir, "test", limit=COUNT)
    images = read_corruption_set(corrupted).load("frost")
    # rows 2..5 of severity 4 alone, as a worker given that slice makes them
    alone = corrupt_block(clean.numpy()[2:], "frost", 4, 3, first=2)
    assert np.array_equal(alone, images[3 * COUNT + 2:4 * COUNT])
    two = prepare_corruptions(cifar_dir, tmp_path / "two", images=COUNT, seed=3, corruptions=("glass_blur",),
                              workers=2)
    assert (two / "glass_blur.npy").read_bytes() == (corrupted / "glass_blur.npy").read_bytes()
    other_seed = corrupt_block(clean.numpy()[:2], "gaussian_noise", 1, 4)
    assert not np.array_equal(other_seed, read_corruption_set(corrupted).load("gaussian_noise")[:2])


@pytest.fixture(scope="module")
def untrained(cifar_dir, tmp_path_factory):
    """An untrained tiny model for CIFAR-10's classes and 32 x 32 images, with a temperature of 1.5."""
    config = resolve_config(load_config(None, ["model.name=tiny", "model.widths=[8, 8, 8]", "model.stem_width=8",
                                               "model.num_classes=10"]))
    state = create_train_state(fnclass.build_model(config.model), sgd(0.1), fnclass.key(0))
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_checkpoint(path, state, config=config, classes=load_classes(cifar_dir), mean=(0.5,) * 3, std=(0.25,) * 3,
                    input_size=(32, 32))
    from fnclass.run.checkpoint import set_temperature

    set_temperature(path, 1.5, weights="raw", calibration={})
    return path


def test_eval_corruptions_reports_each_set_as_a_hand_evaluation_would(corrupted, untrained, cifar_dir, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(untrained), "--data-dir", str(cifar_dir), "--limit", "50",
                                       "--corruptions", str(corrupted), "--corruptions-plot",
                                       str(tmp_path / "c.png"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["corruptions"]
    ckpt = load_checkpoint(untrained)
    corruption_set = read_corruption_set(corrupted)
    labels = torch.from_numpy(corruption_set.labels)
    expected_rows = []
    for name in CORRUPTIONS:
        images = torch.from_numpy(corruption_set.load(name))
        for s in SEVERITIES:
            with torch.no_grad():
                logits = ckpt.logits(images[(s - 1) * COUNT:s * COUNT])
            expected_rows.append(calibration_metrics(logits, labels, 1.5))
    assert len(report["rows"]) == 75 and report["temperature"] == 1.5
    for row, expected in zip(report["rows"], expected_rows):
        for metric in ("accuracy", "nll", "ece", "brier"):
            assert row[metric] == pytest.approx(expected[metric], rel=1e-5, abs=1e-7)
    assert report["mean"]["nll"] == pytest.approx(np.mean([e["nll"] for e in expected_rows]), rel=1e-6)
    assert report["by_severity"]["5"]["accuracy"] == pytest.approx(
        np.mean([e["accuracy"] for e in expected_rows[4::5]]))
    assert (tmp_path / "c.png").stat().st_size > 10_000
    table = CliRunner().invoke(main, ["eval", str(untrained), "--data-dir", str(cifar_dir), "--limit", "50",
                                      "--corruptions", str(corrupted)])
    assert table.exit_code == 0 and "elastic_transform" in table.output and "severity 5" in table.output


def test_bad_corruption_folders_are_one_line_errors(corrupted, untrained, cifar_dir, tmp_path):
    def refused(folder, expected):
        result = CliRunner().invoke(main, ["eval", str(untrained), "--data-dir", str(cifar_dir), "--limit", "10",
                                           "--corruptions", str(folder)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output

    refused(tmp_path, "no manifest.json")
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in corrupted.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    images = np.load(copy / "fog.npy")
    np.save(copy / "fog.npy", images[:-1], allow_pickle=False)
    refused(copy, "SHA-256 differs")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "severities": [1, 2]}))
    refused(copy, "not a fnclass.corruptions/1 manifest")
    with pytest.raises(DataError, match="not the file manifest.json lists"):
        manifest["sha256"]["labels.npy"] = "0" * 64
        (copy / "manifest.json").write_text(json.dumps(manifest))
        read_corruption_set(copy)


def test_prepare_command_and_its_refusals(cifar_dir, tmp_path):
    out = tmp_path / "c"
    result = CliRunner().invoke(main, ["data", "prepare", "cifar10-c", "--from", str(cifar_dir), "--out", str(out),
                                       "--images", "2", "--corruption", "fog", "--corruption", "pixelate"])
    assert result.exit_code == 0, result.output
    assert read_corruption_set(out).corruptions == ("fog", "pixelate")
    before = (out / "fog.npy").read_bytes()
    for args, expected in (([], "already exists"), (["--corruption", "rain"], "unknown corruption")):
        again = CliRunner().invoke(main, ["data", "prepare", "cifar10-c", "--from", str(cifar_dir), "--out",
                                          str(out if not args else tmp_path / "new"), "--images", "2", *args])
        lines = again.output.strip().splitlines()
        assert again.exit_code == 2 and len(lines) == 1 and expected in lines[0], again.output
    assert (out / "fog.npy").read_bytes() == before
    missing = CliRunner().invoke(main, ["data", "prepare", "cifar10-c", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "--from" in missing.output


def test_evaluate_corruptions_takes_any_logits_function(corrupted):
    corruption_set = read_corruption_set(corrupted)
    labels = torch.from_numpy(corruption_set.labels)
    perfect = lambda images: 10.0 * torch.nn.functional.one_hot(labels[:len(images)], 10).float()
    result = evaluate_corruptions(perfect, corruption_set, batch_size=COUNT)
    assert result["mean"]["accuracy"] == 1.0 and result["mean"]["ece"] < 1e-3
