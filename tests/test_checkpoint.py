"""Checkpoints: safetensors round trip, no pickle, clean errors, atomic writes."""

import json

import pytest
import safetensors.torch
import torch

import fnclass
from fnclass import checkpoint, data, io, optim, tree
from fnclass.config import load_config
from fnclass.models import resolve_config
from fnclass.recipe import create_optimizer
from fnclass.step import create_train_state

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
    assert ckpt.config == CONFIG and ckpt.classes == tuple(f"c{i}" for i in range(10)) and ckpt.step == 1
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
    safetensors.torch.save_file(tensors, tmp_path / "mismatch.safetensors", metadata=meta)
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
