"""The model zoo: the shipped weights reach their cards' accuracy on the real test set, and the zoo is data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fnclass
from fnclass.cli import main
from fnclass.data import file_sha256, load_split
from fnclass.run import zoo
from fnclass.run.export import load_for_evaluation
from tests.oneline import one_error_line

ENTRIES = sorted(zoo.cards())


def test_the_zoo_ships_the_cpu_model_with_a_complete_card():
    assert "cifar10-cpu" in ENTRIES
    entry = zoo.card("cifar10-cpu")
    weights = zoo.FOLDER / entry["weights"]
    assert file_sha256(weights) == entry["weights_sha256"] and weights.stat().st_size == entry["weights_bytes"]
    assert entry["weights_bytes"] < 5e6  # "a few MB at most"
    assert entry["accuracy"]["test_tta"] >= 0.88  # issue 14's target for configs/cpu.toml
    assert set(entry["data"]["sha256"]) == {"train_images.npy", "train_labels.npy", "test_images.npy",
                                            "test_labels.npy", "classes.txt"}
    for key in ("date", "device", "machine", "torch", "train_seconds", "wall"):
        assert entry["trained"][key], key
    assert entry["trained"]["precision"] in ("fp32", "bf16")  # which arithmetic trained the weights (issue 31)


@pytest.mark.parametrize("name", ENTRIES)
def test_shipped_weights_reach_their_cards_accuracy_on_the_real_test_set(cifar_dir, name):
    entry = zoo.card(name)
    for file, digest in entry["data"]["sha256"].items():  # the card's data is the data at hand
        assert file_sha256(cifar_dir / file) == digest, file
    result = CliRunner().invoke(main, ["eval", "--model", name, "--tta", "--data-dir", str(cifar_dir), "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert measured["images"] == entry["data"]["test_images"]
    assert abs(measured["accuracy"] - entry["accuracy"]["test"]) <= 1e-4, (measured["accuracy"], entry["accuracy"])
    assert abs(measured["accuracy_tta"] - entry["accuracy"]["test_tta"]) <= 1e-4, (measured, entry["accuracy"])
    for metric in ("nll", "ece", "brier"):  # the card's calibration figures, measured the same way
        assert abs(measured[metric] - entry["calibration"]["test"][metric]) <= 1e-4, (metric, measured[metric])
    assert measured["temperature"] == (entry["calibration"]["temperature"] or 1.0)


def test_pretrained_is_the_export_computed_in_float32(cifar_dir):
    model = fnclass.pretrained("cifar10-cpu")
    images, labels = load_split(cifar_dir, "test", limit=200)
    reference = load_for_evaluation(zoo.weights_path("cifar10-cpu"))
    assert model.dtype == torch.float32 and model.classes == tuple((cifar_dir / "classes.txt").read_text().split())
    with torch.no_grad():
        logits = model.logits(images)
        torch.testing.assert_close(logits, reference.logits(images), rtol=0, atol=0)
    assert (logits.argmax(1) == labels).float().mean() > 0.8


def test_predict_with_a_pretrained_model_names_the_class_its_logits_choose(cifar_dir, tmp_path):
    from PIL import Image

    images, _ = load_split(cifar_dir, "test", limit=4)
    paths = []
    for i, image in enumerate(images.numpy()):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    result = CliRunner().invoke(main, ["predict", "--model", "cifar10-cpu", *map(str, paths), "--top", "2", "--json"])
    assert result.exit_code == 0, result.output
    model = fnclass.pretrained("cifar10-cpu")
    with torch.no_grad():
        probabilities = torch.softmax(model.logits(images), dim=-1)
    for prediction, row in zip(json.loads(result.stdout)["predictions"], probabilities):
        assert prediction["top"][0]["class"] == model.classes[int(row.argmax())]
        assert prediction["top"][0]["probability"] == pytest.approx(float(row.max()), abs=1e-6)


def test_models_lists_every_card():
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    assert [entry["name"] for entry in json.loads(result.stdout)] == ENTRIES
    table = CliRunner().invoke(main, ["models"])
    assert table.exit_code == 0 and "cifar10-cpu" in table.stdout


def _copy_entry(folder: Path, name: str) -> dict:
    """A second zoo entry made from the shipped one by adding two files, as a new entry would be."""
    entry = {**zoo.card("cifar10-cpu"), "name": name, "weights": f"{name}.safetensors"}
    shutil.copy(zoo.FOLDER / "cifar10-cpu.safetensors", folder / entry["weights"])
    (folder / f"{name}.json").write_text(json.dumps(entry))
    return entry


def test_a_new_entry_is_two_files_and_no_code(tmp_path):
    _copy_entry(tmp_path, "cifar10-other")
    assert list(zoo.cards(tmp_path)) == ["cifar10-other"]
    model = zoo.pretrained("cifar10-other", folder=tmp_path)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    torch.testing.assert_close(model.logits(images), fnclass.pretrained("cifar10-cpu").logits(images))


def test_weights_that_differ_from_their_card_are_refused(tmp_path):
    entry = _copy_entry(tmp_path, "cifar10-other")
    weights = tmp_path / entry["weights"]
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooError, match="SHA-256 differs from the model card"):
        zoo.pretrained("cifar10-other", folder=tmp_path)
    weights.unlink()
    with pytest.raises(zoo.ZooError, match="missing from this installation"):
        zoo.pretrained("cifar10-other", folder=tmp_path)


def test_a_card_without_its_fields_is_refused(tmp_path):
    (tmp_path / "broken.json").write_text(json.dumps({"format": zoo.FORMAT, "name": "broken"}))
    with pytest.raises(zoo.ZooError, match="missing summary, weights"):
        zoo.cards(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(zoo.ZooError, match="not a readable model card"):
        zoo.cards(tmp_path)


def test_unknown_names_and_ambiguous_models_get_one_line(tmp_path):
    one_error_line(["eval", "--model", "cifar11"], "no pretrained model named 'cifar11'", "cifar10-cpu",
                   "fnclass models")
    one_error_line(["predict", "--model", "cifar11", str(tmp_path / "a.png")], "no pretrained model named")
    one_error_line(["eval"], "give either a CHECKPOINT file or --model NAME", "neither")
    one_error_line(["eval", str(tmp_path / "x.safetensors"), "--model", "cifar10-cpu"], "both")
    one_error_line(["predict", "--model", "cifar10-cpu"], "no images to classify")
    one_error_line(["predict", str(tmp_path / "model.safetensors")], "give a MODEL file and one or more images")
