"""``fnclass data prepare`` and ``fnclass data info`` through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torchvision.datasets
from click.testing import CliRunner
from PIL import Image

from fnclass import data as library
from fnclass.cli.data import data


@pytest.fixture
def folder(tmp_path):
    """A small canonical folder with 3 classes and known counts."""
    rng = np.random.default_rng(0)
    train_labels, test_labels = np.array([0, 0, 0, 1, 2, 2]), np.array([0, 1, 1, 2])
    library.write_dataset(tmp_path / "set", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), train_labels,
                          rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), test_labels, ["cat", "dog", "[emu]"])
    return tmp_path / "set"


def test_info_prints_counts_stats_and_checksums(folder):
    result = CliRunner().invoke(data, ["info", str(folder)])
    assert result.exit_code == 0, result.output
    info = library.dataset_info(folder)
    rows = {line.split("│")[2].strip(): line for line in result.stdout.splitlines()
            if line.count("│") == 5 and line.split("│")[1].strip().isdigit()}
    assert set(rows) == {"cat", "dog", "[emu]"}  # a name in brackets is shown, not read as rich markup
    assert [cell.strip() for cell in rows["cat"].split("│")[1:5]] == ["0", "cat", "3", "1"]
    assert [cell.strip() for cell in rows["[emu]"].split("│")[1:5]] == ["2", "[emu]", "2", "1"]
    assert "8 x 8 x 3" in result.stdout
    assert " ".join(f"{value:.4f}" for value in info["mean"]) in result.stdout
    for name, digest in info["sha256"].items():
        assert f"{digest}  {name}" in result.stdout.splitlines()
    assert info["sha256_all"] in result.stdout


def test_info_json_is_one_object_equal_to_dataset_info(folder):
    result = CliRunner().invoke(data, ["info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == library.dataset_info(folder)


def test_info_on_a_bad_folder_is_one_error_line_with_exit_code_2(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    result = CliRunner().invoke(data, ["info", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert "train_images.npy is missing" in result.stderr and "Traceback" not in result.output


def test_prepare_from_an_image_folder(tmp_path):
    for code, name in enumerate(("b", "a")):
        for index in range(5):
            (tmp_path / "src" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 30), (100 * code, 10 * index, 0)).save(tmp_path / "src" / name / f"{index}.png")
    result = CliRunner().invoke(data, ["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                                       "--size", "16", "--test-fraction", "0.4"])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'out'}" in result.stdout
    loaded = library.load_dataset(tmp_path / "out")
    assert loaded.classes == ("a", "b")
    assert loaded.train_images.shape == (6, 16, 16, 3) and loaded.test_images.shape == (4, 16, 16, 3)


def test_prepare_from_a_bad_folder_is_one_error_line_with_exit_code_2(tmp_path):
    for name in ("a", "b"):
        for index in range(2):
            (tmp_path / "src" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "src" / name / f"{index}.png")
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(b"\xff\xd8 broken")
    result = CliRunner().invoke(data, ["prepare", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                                       "--test-fraction", "0.5"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert str(tmp_path / "src" / "a" / "x.jpg") in result.stderr


def test_prepare_cifar10_without_download_reports_where_it_looked(tmp_path, monkeypatch):
    def missing(root, train=True, download=False):
        raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", missing)
    result = CliRunner().invoke(data, ["prepare", "cifar10", "--out", str(tmp_path / "out"), "--no-download"])
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1
    assert str(tmp_path / "out" / "torchvision") in result.stderr and "downloading is off" in result.stderr


@pytest.mark.parametrize("command", [[], ["prepare"], ["info"]])
def test_help_has_a_purpose_and_an_example(command):
    result = CliRunner().invoke(data, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.stdout and "fnclass data " in result.stdout
