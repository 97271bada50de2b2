"""Calibration metrics against torchmetrics and hand computations; temperature scaling against scipy and
torch.optim.LBFGS; the temperature in checkpoints, exports, `fnclass predict`, `eval` and `calibrate`."""

import json
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from click.testing import CliRunner
from torchmetrics.functional.classification import multiclass_calibration_error

from fnclass.cli import main
from fnclass.config import ConfigError, load_config
from fnclass.data import load_split, validation_split
from fnclass.run import export
from fnclass.run.checkpoint import CheckpointError, load_checkpoint, read_file, serialize, set_temperature
from fnclass.training import calibration
from fnclass.training.evaluate import evaluate_members
from fnclass.training.program import train
from tests.needs import require_onnx


def _logits(count: int, classes: int, scale: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(count, classes, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    return logits, labels


@pytest.mark.parametrize("classes,scale,seed", [(10, 2.0, 0), (10, 6.0, 1), (3, 0.5, 2), (100, 4.0, 3)])
def test_ece_equals_torchmetrics_calibration_error(classes, scale, seed):
    logits, labels = _logits(20_000, classes, scale, seed)
    probabilities = torch.softmax(logits, dim=-1)
    expected = multiclass_calibration_error(probabilities, labels, num_classes=classes, n_bins=15, norm="l1").item()
    ours = calibration.calibration_metrics(logits, labels)["ece"]
    assert 0.01 < expected and abs(ours - expected) < 1e-5  # torchmetrics sums in float32


def test_metrics_by_hand():
    # probabilities chosen away from the bin edges (multiples of 1/15); 0.90 and 0.91 share the bin [13/15, 14/15)
    probabilities = torch.tensor([[0.90, 0.10], [0.62, 0.38], [0.30, 0.70], [0.55, 0.45], [0.91, 0.09]],
                                 dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1])
    metrics = calibration.calibration_metrics(probabilities.log(), labels)
    # bins: {0.90 right, 0.91 wrong} -> |0.5 - 0.905|; 0.62 wrong -> 0.62; 0.70 right -> 0.30; 0.55 right -> 0.45
    assert metrics["ece"] == pytest.approx((2 * 0.405 + 0.62 + 0.30 + 0.45) / 5, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    p_true = torch.tensor([0.90, 0.38, 0.70, 0.55, 0.09], dtype=torch.float64)
    assert metrics["nll"] == pytest.approx(-p_true.log().mean().item(), abs=1e-12)
    brier = [(0.1 ** 2 + 0.1 ** 2), 2 * 0.62 ** 2, 2 * 0.3 ** 2, 2 * 0.45 ** 2, 2 * 0.91 ** 2]
    assert metrics["brier"] == pytest.approx(sum(brier) / 5, abs=1e-12)
    table = metrics["reliability"]
    assert table["count"][13] == 2 and sum(table["count"]) == 5
    assert table["accuracy"][13] == 0.5 and table["confidence"][13] == pytest.approx(0.905)


def test_the_last_bin_holds_confidence_one():
    table = calibration.reliability(torch.tensor([1.0, 0.99, 0.0]), torch.tensor([True, False, False]))
    assert table["count"][14] == 2 and table["count"][0] == 1


def test_temperature_scaling_recovers_a_known_temperature():
    # labels drawn from softmax(z), logits handed over as 2.5 z: the NLL-optimal temperature is close to 2.5
    generator = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(40_000, 10, generator=generator)
    labels = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator)[:, 0]
    temperature = calibration.fit_temperature(2.5 * z, labels)
    assert abs(temperature - 2.5) < 0.08
    before = calibration.calibration_metrics(2.5 * z, labels)
    after = calibration.calibration_metrics(2.5 * z, labels, temperature)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] / 3
    assert after["accuracy"] == before["accuracy"]


def test_fitted_temperature_is_the_minimum_scipy_and_lbfgs_find():
    z, _ = _logits(5_000, 10, 2.0, seed=4)
    labels = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=torch.Generator().manual_seed(5))[:, 0]
    logits = 1.8 * z  # overconfident
    ours = calibration.fit_temperature(logits, labels)
    found = scipy.optimize.minimize_scalar(lambda t: calibration.nll(logits, labels, t), bounds=(0.05, 50),
                                           method="bounded", options={"xatol": 1e-9})
    assert ours == pytest.approx(found.x, rel=1e-4)
    # the stateful reference: torch.optim.LBFGS on log T
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits.double() / log_t.exp(), labels)
        loss.backward()
        return loss
    optimizer.step(closure)
    assert ours == pytest.approx(log_t.exp().item(), rel=1e-4)


def test_temperature_refuses_what_it_cannot_fit():
    logits, labels = _logits(100, 10, 1.0)
    with pytest.raises(calibration.CalibrationError, match="not all finite"):
        calibration.fit_temperature(torch.cat([logits, torch.full((1, 10), math.nan)]),
                                    torch.cat([labels, labels[:1]]))
    with pytest.raises(calibration.CalibrationError, match="edge of the search range"):
        calibration.fit_temperature(torch.zeros(100, 10), labels)  # the NLL does not depend on T
    with pytest.raises(calibration.CalibrationError, match="data.val_size"):
        calibration.fit_temperature(torch.zeros(0, 10), labels[:0])


def _table_step(table):
    """An eval step whose logits are rows of ``table`` looked up by the image's first pixel."""
    return lambda params, state, x: table[params][x[:, 0, 0, 0].round().long()]


def test_evaluation_reports_calibration_of_members_and_ensemble_and_the_temperature_divides_the_ensemble():
    logits, labels = _logits(200, 10, 3.0)
    other, _ = _logits(200, 10, 3.0, seed=9)
    step = _table_step({0: logits, 1: other})
    images = torch.arange(200).view(200, 1, 1, 1).expand(200, 2, 2, 3).to(torch.uint8).contiguous()
    kwargs = dict(mean=torch.zeros(1, 3, 1, 1), std=torch.full((1, 3, 1, 1), 1 / 255), batch_size=64)
    result = evaluate_members(step, [(0, None), (1, None)], images, labels, temperature=1.7, **kwargs)
    for got, expected in ((result["members"][0], calibration.calibration_metrics(logits, labels)),
                          (result["members"][1], calibration.calibration_metrics(other, labels)),
                          (result["ensemble"], calibration.calibration_metrics((logits + other) / 2, labels, 1.7))):
        for name in ("nll", "ece", "brier"):
            assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6)
        assert got["nll"] == pytest.approx(got["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def calibrated_run(cifar_dir, tmp_path_factory):
    """A tiny model trained on 4,000 real images with 1,000 held out, and train.calibrate = true."""
    run = tmp_path_factory.mktemp("calibrate") / "run"
    config = load_config(None, ["model.name=tiny", "model.widths=[16,32,64]", "data.train_limit=5000",
                                "data.val_size=1000", "data.test_limit=1000", "train.epochs=2",
                                "train.batch_size=128", "train.calibrate=true"])
    summary = train(config, run, data_dir=str(cifar_dir)).summary
    return run, summary


def _val_and_test(ckpt, cifar_dir):
    images, labels = load_split(cifar_dir, "train", limit=5000)
    val = validation_split(labels, 1000, ckpt.config.data.val_seed)[1]
    test_images, test_labels = load_split(cifar_dir, "test", limit=1000)
    return images[val], labels[val], test_images, test_labels


def test_train_calibrate_fits_the_temperature_on_the_validation_split(calibrated_run, cifar_dir):
    run, summary = calibrated_run
    ckpt = load_checkpoint(run / "checkpoints/last.safetensors")
    val_images, val_labels, test_images, test_labels = _val_and_test(ckpt, cifar_dir)
    with torch.no_grad():
        val_logits, test_logits = ckpt.logits(val_images), ckpt.logits(test_images)
    expected = calibration.fit_temperature(val_logits, val_labels)
    assert ckpt.temperature == pytest.approx(expected, rel=1e-6) and ckpt.temperature != 1.0
    fit = summary["calibration"]
    assert fit["temperature"] == ckpt.temperature and fit["fitted_on"] == "val (1000 images)"
    after = calibration.calibration_metrics(test_logits, test_labels, expected)
    assert fit["test"]["after"]["nll"] == pytest.approx(after["nll"], rel=1e-5)
    assert fit["val"]["after"]["nll"] <= fit["val"]["before"]["nll"]
    before = calibration.calibration_metrics(test_logits, test_labels)
    assert summary["test_nll"] == pytest.approx(before["nll"], rel=1e-4)
    assert summary["test_ece"] == pytest.approx(before["ece"], abs=1e-5)
    assert (run / "plots/reliability.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"val_nll", "val_ece", "val_brier"} <= set(row) for row in rows if row.get("kind") == "epoch")


def test_train_calibrate_without_a_validation_split_is_refused():
    with pytest.raises(ConfigError, match="data.val_size"):
        load_config(None, ["train.calibrate=true"])


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_every_export_and_predict_give_the_calibrated_probabilities(calibrated_run, cifar_dir, tmp_path, fmt):
    if fmt == "onnx":
        require_onnx()
    run, _ = calibrated_run
    path = run / "checkpoints/last.safetensors"
    ckpt = load_checkpoint(path)
    images, _ = load_split(cifar_dir, "test", limit=64)
    with torch.no_grad():
        expected = torch.softmax(ckpt.logits(images) / ckpt.temperature, dim=-1)
    out = tmp_path / f"model.{fmt}"
    export.export_checkpoint(path, out, format=fmt)
    with torch.no_grad():
        probabilities = torch.softmax(export.load_predictor(out, trust_program=True).logits(images), dim=-1)
    assert (probabilities - expected).abs().max() < 1e-5
    assert json.loads(export.export_metadata(ckpt, dtype="float32", source_sha256="")["temperature"]) == \
        ckpt.temperature
    from PIL import Image

    Image.fromarray(images[0].numpy()).save(tmp_path / "image.png")
    result = CliRunner().invoke(main, ["predict", str(out), str(tmp_path / "image.png"), "--top", "10", "--json",
                                       "--trust-program"])
    assert result.exit_code == 0, result.output
    top = json.loads(result.output)["predictions"][0]["top"]
    assert max(entry["probability"] for entry in top) == pytest.approx(expected[0].max().item(), abs=1e-5)


def test_calibrate_command_writes_the_temperature_and_out_leaves_the_source_alone(calibrated_run, cifar_dir,
                                                                                  tmp_path):
    run, _ = calibrated_run
    source = tmp_path / "source.safetensors"
    source.write_bytes((run / "checkpoints/last.safetensors").read_bytes())
    tensors, metadata = read_file(source)
    for key in ("temperature", "temperature_weights", "calibration"):
        metadata.pop(key)
    source.write_bytes(serialize(tensors, metadata))  # the run's checkpoint without its temperature
    before = source.read_bytes()
    assert load_checkpoint(source).temperature == 1.0
    out = tmp_path / "calibrated.safetensors"
    result = CliRunner().invoke(main, ["calibrate", str(source), "--data-dir", str(cifar_dir), "--out", str(out),
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert source.read_bytes() == before
    assert load_checkpoint(out).temperature == pytest.approx(load_checkpoint(run / "checkpoints/last.safetensors")
                                                             .temperature, rel=1e-9)
    assert report["temperature"] == load_checkpoint(out).temperature and report["path"] == str(out)
    evaluated = CliRunner().invoke(main, ["eval", str(out), "--data-dir", str(cifar_dir), "--limit", "500", "--json",
                                          "--plot", str(tmp_path / "reliability.png")])
    assert evaluated.exit_code == 0, evaluated.output
    shown = json.loads(evaluated.output)
    ckpt = load_checkpoint(out)
    images, labels = load_split(cifar_dir, "test", limit=500)
    with torch.no_grad():
        expected = calibration.calibration_metrics(ckpt.logits(images), labels, ckpt.temperature)
    assert shown["temperature"] == ckpt.temperature
    for name in ("nll", "ece", "brier", "accuracy"):
        assert shown[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6)
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    in_place = CliRunner().invoke(main, ["calibrate", str(source), "--data-dir", str(cifar_dir)])
    assert in_place.exit_code == 0, in_place.output
    assert load_checkpoint(source).temperature == load_checkpoint(out).temperature


def test_calibrate_refuses_a_run_without_a_validation_split(tiny_checkpoint, tmp_path):
    before = tiny_checkpoint.read_bytes()
    result = CliRunner().invoke(main, ["calibrate", str(tiny_checkpoint), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "data.val_size = 0" in result.output and "test split would be dishonest" in result.output
    assert tiny_checkpoint.read_bytes() == before


def test_temperature_in_checkpoints(tiny_checkpoint, tmp_path):
    path = tmp_path / "model.safetensors"
    set_temperature(tiny_checkpoint, 2.0, weights="raw", calibration={"fitted_on": "test"}, out=path)
    ckpt = load_checkpoint(path)
    assert ckpt.temperature == 2.0
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(ckpt.calibrated_logits(images), ckpt.logits(images) / 2.0)
    assert load_checkpoint(path, weights="auto").temperature == 2.0
    ema = tmp_path / "ema.safetensors"
    set_temperature(tiny_checkpoint, 2.0, weights="ema", calibration={}, out=ema)
    assert load_checkpoint(ema).temperature == 1.0  # fitted to weights this file does not hold
    with pytest.raises(CheckpointError, match="finite positive"):
        set_temperature(tiny_checkpoint, float("nan"), weights="raw", calibration={}, out=path)
    assert load_checkpoint(path).temperature == 2.0  # nothing written
    tensors, metadata = read_file(path)
    path.write_bytes(serialize(tensors, {**metadata, "temperature": "-1"}))
    with pytest.raises(CheckpointError, match="not a positive number"):
        load_checkpoint(path)


def test_reliability_diagram_is_drawn(tmp_path):
    logits, labels = _logits(500, 10, 3.0)
    metrics = calibration.calibration_metrics(logits, labels)
    calibration.plot_reliability(tmp_path / "r.png", {"a": metrics, "b": metrics}, "title")
    assert np.frombuffer((tmp_path / "r.png").read_bytes()[:8], dtype=np.uint8).tolist()[:4] == [137, 80, 78, 71]
