"""Checkpoints: safetensors round trip, no pickle, clean errors, atomic writes."""

import dataclasses
import json

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fnclass
from fnclass import data, io
from fnclass.config import load_config
from fnclass.core import optim, tree
from fnclass.models import resolve_config
from fnclass.run import checkpoint
from fnclass.training.recipe import create_optimizer
from fnclass.training.step import create_train_state
from tests.sealing import reseal

CONFIG = resolve_config(load_config(None, ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8"]))
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _train_state():
    model = fnclass.build_model(CONFIG.model)
    opt = create_optimizer(CONFIG.optim, model.param_labels, 10, 2)
    ts = create_train_state(model, opt, fnclass.key(5))
    grads = tree.tree_map(torch.ones_like, ts.params)
    updates, opt_state = opt.update(grads, ts.opt_state, ts.params)
    return ts._replace(step=ts.step + 1, params=optim.apply_updates(ts.params, updates), opt_state=opt_state), opt


def _save(path, ts):
    checkpoint.save_checkpoint(path, ts, config=CONFIG, classes=[f"c{i}" for i in range(10)], mean=MEAN, std=STD,
                               input_size=(32, 32))


def test_round_trip_restores_everything(tmp_path):
    ts, _ = _train_state()
    _save(tmp_path / "ck.safetensors", ts)
    model = fnclass.build_model(CONFIG.model)
    skeleton = create_train_state(model, create_optimizer(CONFIG.optim, model.param_labels, 10, 2),
                                  fnclass.key(99))
    restored = checkpoint.restore_train_state(tmp_path / "ck.safetensors", skeleton)
    assert tree.tree_allclose(restored, ts, rtol=0, atol=0)
    ckpt = fnclass.load_checkpoint(tmp_path / "ck.safetensors")
    # model.num_classes, left to the data in CONFIG, is recorded as the number of classes the file holds
    assert CONFIG.model.num_classes is None and ckpt.config.model.num_classes == 10
    assert ckpt.config == dataclasses.replace(CONFIG, model=dataclasses.replace(CONFIG.model, num_classes=10))
    assert ckpt.classes == tuple(f"c{i}" for i in range(10)) and ckpt.step == 1
    assert tree.tree_allclose(ckpt.params, ts.params, rtol=0, atol=0)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(ckpt.preprocess(images), data.normalize(images, MEAN, STD))
    logits, _ = ckpt.model.apply(ckpt.params, ckpt.state, ckpt.preprocess(images), train=False)
    assert logits.shape == (4, 10)


def test_keys_are_pytree_paths_and_metadata_is_json(tmp_path):
    ts, _ = _train_state()
    _save(tmp_path / "ck.safetensors", ts)
    tensors = safetensors.torch.load_file(tmp_path / "ck.safetensors")
    assert "params.stem.conv.weight" in tensors and "state.stem.bn.mean" in tensors
    assert "opt_state.0.mu.stem.conv.weight" in tensors and "step" in tensors and "key" in tensors
    with safetensors.safe_open(str(tmp_path / "ck.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["normalization"])["mean"] == list(MEAN)


def test_truncated_and_garbled_files_give_one_line_errors(tmp_path):
    ts, _ = _train_state()
    path = tmp_path / "ck.safetensors"
    _save(path, ts)
    payload = path.read_bytes()
    for name, content in {"cut": payload[: len(payload) // 2], "tiny": payload[:5], "text": b"hello"}.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupted") as info:
            fnclass.load_checkpoint(bad)
        assert "\n" not in str(info.value) and bad.read_bytes() == content
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        fnclass.load_checkpoint(tmp_path / "missing.safetensors")


def test_foreign_or_mismatched_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match="not an fnclass checkpoint"):
        fnclass.load_checkpoint(foreign)
    ts, _ = _train_state()
    path = tmp_path / "ck.safetensors"
    _save(path, ts)
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    meta["config"] = meta["config"].replace('"widths": [8, 16, 16]', '"widths": [8, 16, 32]')
    # re-sealed with a fresh checksum, as a deliberately crafted file would be: the structure check must catch it
    (tmp_path / "mismatch.safetensors").write_bytes(checkpoint.serialize(tensors, meta))
    with pytest.raises(checkpoint.CheckpointError, match="do not fit the model"):
        fnclass.load_checkpoint(tmp_path / "mismatch.safetensors")


def test_write_atomic_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    io.write_atomic(path, b"old")

    def broken_replace(*args):
        raise OSError("disk full")
    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(io.WriteError, match="disk full"):
        io.write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def _one_line(error):
    return "\n" not in str(error) and str(error)


def test_a_flipped_bit_anywhere_is_found_by_the_checksum(tmp_path):
    ts, _ = _train_state()
    path = tmp_path / "ck.safetensors"
    _save(path, ts)
    payload = path.read_bytes()
    header_end = 8 + int.from_bytes(payload[:8], "little")
    positions = list(range(8, header_end, 7)) + list(range(header_end, len(payload), 101))
    assert len(positions) > 1000
    for position in positions:
        bad = bytearray(payload)
        bad[position] ^= 1 << (position % 8)
        path.write_bytes(bad)
        with pytest.raises(checkpoint.CheckpointError) as info:
            fnclass.load_checkpoint(path)
        assert _one_line(info.value)
    body = bytearray(payload)
    body[-5] ^= 1  # without the checksum, a flipped bit in the tensor bytes would load as a wrong number
    path.write_bytes(body)
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        fnclass.load_checkpoint(path)


def test_files_without_a_checksum_still_load(tmp_path):
    """Checkpoints written before checksums were recorded load (unverified), as before."""
    ts, _ = _train_state()
    _save(tmp_path / "ck.safetensors", ts)
    tensors, metadata = checkpoint.read_file(tmp_path / "ck.safetensors")
    del metadata[checkpoint.CHECKSUM]
    safetensors.torch.save_file(tensors, tmp_path / "stripped.safetensors", metadata=metadata)
    with pytest.raises(checkpoint.CheckpointError, match="records a checksum but the file has none"):
        fnclass.load_checkpoint(tmp_path / "stripped.safetensors")  # a current file whose checksum was removed
    metadata["format"] = "fnclass.checkpoint/1"
    safetensors.torch.save_file(tensors, tmp_path / "old.safetensors", metadata=metadata)
    loaded = fnclass.load_checkpoint(tmp_path / "old.safetensors")
    assert all(a.equal(b) for a, b in zip(tree.tree_leaves(loaded.params), tree.tree_leaves(ts.params)))


def _crafted(tmp_path, name, tensors, metadata):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(checkpoint.serialize(tensors, metadata))  # a correct checksum: the checks behind it answer
    return path


def test_crafted_checkpoints_are_refused_with_one_line(tmp_path):
    ts, _ = _train_state()
    _save(tmp_path / "ck.safetensors", ts)
    tensors, metadata = checkpoint.read_file(tmp_path / "ck.safetensors")
    config = json.loads(metadata["config"])
    weight = "params.stem.conv.weight"
    cases = {
        "missing": ({k: v for k, v in tensors.items() if k != weight}, metadata, "do not fit the model"),
        "extra": ({**tensors, "params.extra": torch.zeros(2)}, metadata, "do not fit the model"),
        "dtype": ({**tensors, weight: tensors[weight].double()}, metadata, "expected torch.float32"),
        "shape": ({**tensors, weight: tensors[weight][:, :, :2].contiguous()}, metadata, "do not fit the model"),
        "other_model": (tensors, {**metadata, "config": json.dumps({**config, "model": {
            **config["model"], "name": "resnet_attn"}})}, "do not fit the model"),
        "absurd_widths": (tensors, {**metadata, "config": json.dumps({**config, "model": {
            **config["model"], "widths": [10**12, 10**12, 10**12]}})}, "model.widths .* is not allowed"),
        "absurd_classes": (tensors, {**metadata, "config": json.dumps({**config, "model": {
            **config["model"], "num_classes": 10**15}})}, "num_classes|disagrees"),
        "config_not_json": (tensors, {**metadata, "config": "{"}, "not valid JSON"),
        "no_format": (tensors, {k: v for k, v in metadata.items() if k != "format"}, "not an fnclass checkpoint"),
    }
    for name, (t, m, message) in cases.items():
        path = _crafted(tmp_path, name, t, m)
        before = path.read_bytes()
        with pytest.raises(checkpoint.CheckpointError, match=message) as info:
            fnclass.load_checkpoint(path)
        assert _one_line(info.value) and str(info.value).startswith(str(path)) and path.read_bytes() == before, name
        skeleton = ts._replace(step=ts.step)
        with pytest.raises(checkpoint.CheckpointError):  # the resume path refuses it too
            checkpoint.restore_train_state(path, skeleton) if name in ("missing", "extra", "dtype", "shape") else (
                fnclass.load_checkpoint(path))


def test_header_lengths_that_lie_are_refused_before_reading(tmp_path):
    ts, _ = _train_state()
    _save(tmp_path / "ck.safetensors", ts)
    payload = (tmp_path / "ck.safetensors").read_bytes()
    for name, length in {"huge": 2**63 + 5, "minus_one": 2**64 - 1, "past_end": len(payload),
                         "zero": 0}.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(length.to_bytes(8, "little") + payload[8:])
        with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupted|not valid JSON") as info:
            fnclass.load_checkpoint(path)
        assert _one_line(info.value)
    duplicate = tmp_path / "duplicate.safetensors"  # a header naming one tensor twice
    size = int.from_bytes(payload[:8], "little")
    header = payload[8:8 + size].decode().rstrip()
    first = header[1:header.index("},") + 1]
    forged = ("{" + first + "," + header[1:]).encode()
    forged += b" " * (-len(forged) % 8)
    duplicate.write_bytes(len(forged).to_bytes(8, "little") + forged + payload[8 + size:])
    with pytest.raises(checkpoint.CheckpointError) as info:
        fnclass.load_checkpoint(duplicate)
    assert _one_line(info.value)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_checkpoint_bytes_load_or_fail_cleanly(checkpoint_bytes, tmp_path, data):
    """Damaged (checksum left as it was) or crafted (checksum recomputed) bytes: a CheckpointError or a load."""
    payload, skeleton = checkpoint_bytes
    blob = bytearray(payload)
    header_end = 8 + int.from_bytes(blob[:8], "little")
    spans = st.integers(0, header_end - 1) | st.integers(0, len(blob) - 1)
    for position, value in data.draw(st.lists(st.tuples(spans, st.integers(0, 255)), min_size=1, max_size=4)):
        blob[position] = value
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    if data.draw(st.booleans()):
        blob = reseal(bytes(blob)) or blob
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(blob))
    for load in (fnclass.load_checkpoint, lambda p: checkpoint.restore_train_state(p, skeleton)):
        try:
            load(path)
        except checkpoint.CheckpointError as error:
            assert _one_line(error) and str(error).startswith(str(path))


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    ts, _ = _train_state()
    path = tmp_path_factory.mktemp("ck") / "ck.safetensors"
    _save(path, ts)
    return path.read_bytes(), ts
