"""The one atomic writer: files get the umask's permissions, a failed write keeps the old file."""

import os
import stat

import pytest
import torch

import fnclass
from fnclass import io
from fnclass.checkpoint import save_checkpoint
from fnclass.config import load_config
from fnclass.models import resolve_config


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_umask_permissions(tmp_path, umask_022):
    io.write_atomic(tmp_path / "a.bin", b"x")
    io.write_json(tmp_path / "b.json", {"a": 1})
    config = resolve_config(load_config(None, ["model.name=tiny", "model.widths=[8, 16, 16]"]))
    model = fnclass.build_model(config.model)
    from fnclass import optim

    ts = fnclass.create_train_state(model, optim.sgd(0.1), fnclass.key(0))
    save_checkpoint(tmp_path / "c.safetensors", ts, config=config, classes=[str(i) for i in range(10)],
                    mean=(0.5,) * 3, std=(0.25,) * 3, input_size=(32, 32))
    # tempfile.mkstemp would have made them 0600; a user's files follow the user's umask.
    assert [_mode(tmp_path / name) for name in ("a.bin", "b.json", "c.safetensors")] == [umask_022] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json", "c.safetensors"]  # no temp left


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    io.write_atomic(path, b"old")

    def fail(handle):
        handle.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        io.write_atomic(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_pick_device():
    assert io.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(fnclass.config.ConfigError, match="--device cuda"):
            io.pick_device("cuda")
