"""Export to safetensors, pt2 and ONNX against the source checkpoint on real CIFAR-10; `fnclass predict`."""

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import fnclass
from fnclass.cli import main
from fnclass.config import load_config
from fnclass.data import file_sha256, load_split, read_image
from fnclass.models import resolve_config
from fnclass.run import export
from fnclass.run.checkpoint import CheckpointError, read_file, serialize
from fnclass.training.program import train
from tests.needs import require_onnx
from tests.sealing import reseal

HERE = Path(__file__).resolve().parent
TRAIN = ["model.name=tiny", "data.train_limit=8000", "data.test_limit=256", "train.epochs=2",
         "train.batch_size=128"]
LOW_PRECISION = [("safetensors", "bfloat16"), ("safetensors", "float16"), ("pt2", "bfloat16"), ("pt2", "float16"),
                 ("onnx", "float16")]


@pytest.fixture(scope="module")
def trained(cifar_dir, tmp_path_factory):
    """A tiny model trained for 2 epochs on 8,000 real images (about 50% test accuracy), and the test split."""
    run = tmp_path_factory.mktemp("export") / "run"
    train(load_config(None, TRAIN), run, data_dir=str(cifar_dir))
    images, labels = load_split(cifar_dir, "test")
    return run / "checkpoints/last.safetensors", images, labels


@pytest.fixture(scope="module")
def reference_logits(trained):
    """The checkpoint's own float32 logits on the whole test split."""
    path, images, _ = trained
    return _logits(export.load_predictor(path), images)


def _logits(predictor, images, batch=1000):
    with torch.no_grad():
        return torch.cat([predictor.logits(images[i:i + batch]) for i in range(0, len(images), batch)])


def _export(trained, tmp_path, fmt, dtype="float32"):
    if fmt == "onnx":
        require_onnx()
    out = tmp_path / f"model.{dtype}.{fmt}"
    export.export_checkpoint(trained[0], out, format=fmt, dtype=dtype)
    return out


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_float32_export_equals_the_checkpoint_on_real_images(trained, reference_logits, tmp_path, fmt):
    _, images, _ = trained
    predictor = export.load_predictor(_export(trained, tmp_path, fmt), trust_program=True)
    assert predictor.format == fmt and predictor.classes == fnclass.load_checkpoint(trained[0]).classes
    logits = _logits(predictor, images[:256])
    assert logits.dtype == torch.float32 and logits.shape == (256, 10)
    assert (logits - reference_logits[:256]).abs().max() < 1e-4


@pytest.mark.parametrize("fmt,dtype", LOW_PRECISION)
def test_low_precision_export_keeps_logits_and_predictions(trained, reference_logits, tmp_path, fmt, dtype):
    # The first 4,000 test images: float16 arithmetic on a CPU without float16 units is emulated and slow.
    images, labels, reference_logits = trained[1][:4000], trained[2][:4000], reference_logits[:4000]
    assert (reference_logits.argmax(1) == labels).double().mean() > 0.4  # it learned: predictions worth keeping
    predictor = export.load_predictor(_export(trained, tmp_path, fmt, dtype), trust_program=True)
    logits = _logits(predictor, images)
    eps = torch.finfo(export.DTYPES[dtype]).eps
    # The weights and each layer's output are rounded to `dtype`, half an eps each: over the network's depth the
    # logits may move by a few eps of their scale. Measured over the 10,000 test images: 1.6 eps (bfloat16), 1.2-1.3
    # (float16); weights rounded to fp8 (e4m3) give 9-10 eps, a bfloat16 program where float16 was asked 13.
    error = (logits - reference_logits).abs().max() / reference_logits.abs().max()
    assert error <= 5 * eps, f"{error / eps:.1f} eps of the logits' scale"
    # Changed predictions, not accuracy, where flips both ways cancel. A flip needs a float32 top-two margin within
    # the logit error, so their share scales with eps: 108 (bfloat16) and 9-19 (float16) of 10,000 on this
    # project's CPU, 36 and 3 on another; fp8-rounded weights change 708.
    # (On 4,000 images: 5 eps of float16 allows 19 changes where 4-8 are expected.)
    changed = (logits.argmax(1) != reference_logits.argmax(1)).double().mean()
    assert changed <= 5 * eps, f"{changed:.2%} of the predictions changed"


@pytest.mark.parametrize("fmt", ["pt2", "safetensors"])
def test_export_runs_where_fnclass_cannot_be_imported(trained, reference_logits, tmp_path, fmt):
    path, images, _ = trained
    model = _export(trained, tmp_path, fmt)
    np.save(tmp_path / "images.npy", images[:256].numpy(), allow_pickle=False)
    subprocess.run([sys.executable, str(HERE / "run_without_fnclass.py"), str(model), str(tmp_path / "images.npy"),
                    str(tmp_path / "logits.npy")], check=True, cwd=tmp_path)
    logits = torch.from_numpy(np.load(tmp_path / "logits.npy", allow_pickle=False))
    assert (logits - reference_logits[:256]).abs().max() < 1e-4


def test_safetensors_export_holds_inference_weights_and_metadata(trained, tmp_path):
    path, _, _ = trained
    ckpt = fnclass.load_checkpoint(path)
    out = _export(trained, tmp_path, "safetensors", "bfloat16")
    with safetensors.safe_open(str(out), framework="pt") as handle:
        names, metadata = set(handle.keys()), handle.metadata()
        dtypes = {handle.get_tensor(name).dtype for name in names}
    assert names == {k for k in ckpt.tensors if k.startswith(("params.", "state."))}  # no optimizer state
    assert dtypes == {torch.bfloat16}
    assert json.loads(metadata["config"])["model"] == json.loads(ckpt.metadata["config"])["model"]
    assert metadata["source_sha256"] == file_sha256(path) and metadata["model"] == "tiny"
    assert json.loads(metadata["input_size"]) == [32, 32] and metadata["dtype"] == "bfloat16"
    loaded = fnclass.load_exported(out)
    assert loaded.classes == ckpt.classes and loaded.dtype == torch.bfloat16 and loaded.mean == ckpt.mean


def test_pt2_and_onnx_have_a_dynamic_batch_and_metadata(trained, reference_logits, tmp_path):
    _, images, _ = trained
    for fmt in ("pt2", "onnx"):
        predictor = export.load_predictor(_export(trained, tmp_path, fmt), trust_program=True)
        assert predictor.classes[0] == "airplane" and predictor.input_size == (32, 32)
        for n in (1, 3, 17, 1000):
            logits = predictor.logits(images[:n])
            # float32 in both: rounding over the longest reduction (128 channels x 3 x 3) of the logits' scale.
            tolerance = torch.finfo(torch.float32).eps * 128 * 9 * reference_logits[:n].abs().max()
            assert logits.shape == (n, 10) and (logits - reference_logits[:n]).abs().max() <= tolerance, (fmt, n)


def _png(path, array, size=None):
    image = Image.fromarray(array)
    (image.resize(size, Image.Resampling.BICUBIC) if size else image).save(path)
    return path


def test_predict_command_matches_the_model_on_decoded_images(trained, tmp_path):
    path, images, _ = trained
    files = [_png(tmp_path / "a.png", images[0].numpy()), _png(tmp_path / "b.png", images[1].numpy(), (80, 60))]
    pt2 = _export(trained, tmp_path, "pt2")
    result = CliRunner().invoke(main, ["predict", str(pt2), *map(str, files), "--top", "3", "--json",
                                       "--trust-program"])
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.output)["predictions"]
    decoded = torch.stack([torch.tensor(read_image(f, 32)) for f in files])
    assert (decoded[0] == images[0]).all()  # a 32x32 PNG is decoded exactly
    ckpt = fnclass.load_checkpoint(path)
    with torch.no_grad():
        logits, _ = ckpt.model.apply(ckpt.params, ckpt.state, ckpt.preprocess(decoded), train=False)
    for row, probabilities in zip(predictions, torch.softmax(logits, dim=-1)):
        top = probabilities.topk(3)
        assert [guess["class"] for guess in row["top"]] == [ckpt.classes[int(i)] for i in top.indices]
        assert np.allclose([guess["probability"] for guess in row["top"]], top.values.numpy(), atol=1e-5)
    table = CliRunner().invoke(main, ["predict", str(path), str(files[0])])
    assert table.exit_code == 0 and predictions[0]["top"][0]["class"] in table.output


def _one_line_error(args, expected):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.output


def test_bad_inputs_are_one_line_errors_and_leave_files_alone(trained, tmp_path):
    path, images, _ = trained
    good = _export(trained, tmp_path, "safetensors")
    before = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(before[: len(before) // 2])
    _one_line_error(["predict", str(truncated), str(_png(tmp_path / "x.png", images[0].numpy()))], "truncated")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _one_line_error(["predict", str(text), str(tmp_path / "x.png")], "not a checkpoint, safetensors, pt2 or ONNX")
    broken_image = tmp_path / "broken.png"
    broken_image.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _one_line_error(["predict", str(good), str(broken_image)], "broken.png is not a readable image")
    _one_line_error(["export", str(path), "--format", "onnx", "--dtype", "bfloat16", "--out", str(good)], "bfloat16")
    _one_line_error(["export", str(path), "--format", "zip"], "Invalid value for '--format'")
    _one_line_error(["export", str(path), "--out", str(path)], "would overwrite the checkpoint")
    _one_line_error(["export", str(path), "--out", str(good / "model.safetensors")], "cannot create its folder")
    _one_line_error(["export", str(good), "--out", str(tmp_path / "again.pt2"), "--format", "pt2"],
                    "not an fnclass checkpoint")
    pt2 = _export(trained, tmp_path, "pt2")
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(pt2.read_bytes()[:-2000])
    _one_line_error(["predict", str(damaged), str(tmp_path / "x.png"), "--trust-program"],
                    "not a readable pt2 program")
    _one_line_error(["predict", str(pt2), str(tmp_path / "x.png")], "pass --trust-program")
    assert good.read_bytes() == before
    with pytest.raises(CheckpointError, match="a training checkpoint: use load_checkpoint"):
        export.load_exported(path)


def test_config_that_does_not_fit_the_weights_is_rejected(trained, tmp_path):
    good = _export(trained, tmp_path, "safetensors")
    tensors, metadata = read_file(good)
    config = json.loads(metadata["config"])
    config["model"]["widths"] = [32, 64, 256]
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(serialize(tensors, {**metadata, "config": json.dumps(config)}))  # a fresh checksum
    with pytest.raises(CheckpointError, match="do not fit the model in its config"):
        export.load_exported(tampered)
    _one_line_error(["predict", str(tampered), str(_png(tmp_path / "x.png", trained[1][0].numpy()))], "do not fit")


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """A small exported model (random weights) to fuzz."""
    from fnclass.core.optim import sgd
    from fnclass.run.checkpoint import save_checkpoint
    from fnclass.training.step import create_train_state

    config = resolve_config(load_config(None, ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8"]))
    folder = tmp_path_factory.mktemp("fuzz")
    state = create_train_state(fnclass.build_model(config.model), sgd(0.1), fnclass.key(0))
    save_checkpoint(folder / "ck.safetensors", state, config=config, classes=[f"c{i}" for i in range(10)],
                    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(32, 32))
    export.export_checkpoint(folder / "ck.safetensors", folder / "model.safetensors")
    return (folder / "model.safetensors").read_bytes()


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_safetensors_bytes_load_cleanly_or_fail_cleanly(small_export, tmp_path, monkeypatch, data):
    header_length = int.from_bytes(small_export[:8], "little")
    blob = bytearray(small_export)
    edits = data.draw(st.lists(st.tuples(st.integers(0, header_length + 7), st.integers(0, 255)), min_size=1,
                               max_size=4) | st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)),
                                                      min_size=1, max_size=4))
    for position, value in edits:
        blob[position] = value
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    if data.draw(st.booleans()):  # crafted rather than damaged: a correct checksum over the edited bytes
        blob = reseal(bytes(blob)) or blob
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(blob))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("something tried to unpickle")
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    try:
        loaded = export.load_exported(path)
    except CheckpointError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
    else:
        assert loaded.logits(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape == (2, 10)


class _RunsCode:
    """A pickle that, when loaded, creates a file: what a crafted model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_crafted_pt2_cannot_run_code(trained, tmp_path):
    pt2, marker = _export(trained, tmp_path, "pt2"), tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(pt2) as source, zipfile.ZipFile(crafted, "w") as target:
        for info in source.infolist():  # torch.export.load unpickles the sample inputs, weights_only=False as fallback
            payload = source.read(info.filename)
            target.writestr(info, pickle.dumps(_RunsCode(marker)) if "sample_inputs" in info.filename else payload)
    image = str(_png(tmp_path / "x.png", trained[1][0].numpy()))
    # Even when trusted, a pickle is refused: every torch.load inside runs weights-only.
    _one_line_error(["predict", str(crafted), image, "--trust-program"], "holds objects that are not tensors")
    assert not marker.exists()


def test_pt2_programs_are_not_loaded_without_trust(trained, tmp_path):
    pt2, marker = _export(trained, tmp_path, "pt2"), tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(pt2) as source, zipfile.ZipFile(crafted, "w") as target:
        for info in source.infolist():  # torch.export.load exec()s the guards stored in the program
            payload = source.read(info.filename)
            if info.filename.endswith("models/model.json"):
                program = json.loads(payload)
                program["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch() is None"]
                payload = json.dumps(program).encode()
            target.writestr(info, payload)
    image = str(_png(tmp_path / "x.png", trained[1][0].numpy()))
    _one_line_error(["predict", str(crafted), image], "loading one runs code it contains")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="trust"):
        export.load_predictor(crafted)
    export.load_predictor(crafted, trust_program=True).logits(trained[1][:2])  # trusted: it does run code
    assert marker.exists()


@pytest.mark.parametrize("field,value,message", [
    ("config", "[]", "not a table of sections"),
    ("config", "{\"model\": {\"widths\": [1e9, 1e9, 1e9]}}", "model.widths"),
    ("config", "{\"model\": {\"name\": \"tiny\", \"widths\": [99999999999999999999, 8, 8]}}", "model.widths"),
    ("input_size", "[true, true]", "malformed"),
    ("input_size", "[2, 2]", "malformed"),
    ("classes", "{\"a\": 1}", "malformed"),
    ("normalization", "{\"mean\": [0, 0, 0], \"std\": [0, 1, 1]}", "malformed"),
    ("normalization", "[1, 2]", "malformed"),
    ("dtype", "float64", "dtype"),
    ("format", "other/1", "not an fnclass checkpoint"),
])
def test_tampered_metadata_is_one_line_error(small_export, tmp_path, field, value, message):
    """Structured tampering (valid JSON of the wrong shape), which byte-level fuzzing almost never produces."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(small_export)
    tensors, metadata = read_file(path)
    path.write_bytes(serialize(tensors, {**metadata, field: value}))  # crafted with a fresh checksum
    result = CliRunner().invoke(main, ["predict", str(path), str(_png(tmp_path / "x.png", np.zeros((32, 32, 3),
                                                                                                   np.uint8)))])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, (
        result.output)
