"""The one atomic writer: files get the umask's permissions, a failed write keeps the old file."""

import os
import stat

import pytest
import torch

import fnclass
from fnclass import io
from fnclass.config import load_config
from fnclass.models import resolve_config
from fnclass.run.checkpoint import save_checkpoint


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
    from fnclass.core import optim

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
    with pytest.raises(io.WriteError, match="disk full"):
        io.write_atomic(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_pick_device():
    assert io.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(io.DeviceError, match="--device cuda"):
            io.pick_device("cuda")


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    config = resolve_config(load_config(None, ["model.name=tiny", "model.widths=[8, 16, 16]"]))
    from fnclass.core import optim

    model = fnclass.build_model(config.model)
    meta = dict(config=config, classes=[str(i) for i in range(10)], mean=(0.5,) * 3, std=(0.25,) * 3,
                input_size=(32, 32))
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, fnclass.create_train_state(model, optim.sgd(0.1), fnclass.key(0)), **meta)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(io.os, "fsync", no_space)
    with pytest.raises(io.WriteError, match=f"cannot write {path}: No space left on device") as info:
        save_checkpoint(path, fnclass.create_train_state(model, optim.sgd(0.1), fnclass.key(1)), **meta)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_a_full_disk_during_training_is_one_line_with_exit_code_2(cifar_dir, tmp_path, monkeypatch):
    import errno

    from click.testing import CliRunner

    from fnclass.cli import main

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(io.os, "fsync", no_space)
    result = CliRunner().invoke(main, ["train", "--config", "cpu", "--data-dir", str(cifar_dir), "--out",
                                       str(tmp_path / "run"), "--set", "data.train_limit=256", "--set",
                                       "train.batch_size=128", "--set", "data.test_limit=100", "--set",
                                       "train.epochs=1", "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and lines[0].startswith("error: cannot write")
    assert not list((tmp_path / "run").rglob("*.tmp"))


_MALLINFO_SCRIPT = """
import ctypes, ctypes.util, json
from fnclass.io import keep_freed_memory

fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
libc = ctypes.CDLL(ctypes.util.find_library("c"))
wide = hasattr(libc, "mallinfo2")  # glibc >= 2.33; mallinfo's int fields are enough for these sizes
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t if wide else ctypes.c_int) for name in fields]
info = libc.mallinfo2 if wide else libc.mallinfo
info.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_freed_memory()
before = info()
block = libc.malloc(24 << 20)  # a step's worth of fresh tensors, under the 32 MiB threshold
during = info()
libc.free(block)
after = info()
print(json.dumps({"applied": applied, "mapped": during.hblkhd - before.hblkhd,
                  "heap_kept_after_free": after.arena - before.arena}))
"""


@pytest.mark.parametrize("user_setting", [None, "131072"])
def test_keeping_freed_memory_serves_a_steps_blocks_from_the_heap_and_keeps_them(tmp_path, user_setting):
    """glibc mmaps big blocks and unmaps them on free, so a pure step's fresh tensors would fault in every step.

    The effect on page faults and time is measured by a benchmark (benchmarks/RESULTS.md, "glibc"); counting page
    faults here depended on the machine (glibc raises its mmap threshold by itself after some frees). This checks
    the mechanism, which does not: with keep_freed_memory() a 24 MiB block comes from the heap and stays there after
    it is freed; with the user's own MALLOC_MMAP_THRESHOLD_ it does nothing and glibc maps and unmaps the block.
    """
    import json
    import platform
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if user_setting is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = user_setting
    script = tmp_path / "mallinfo.py"
    script.write_text(_MALLINFO_SCRIPT)
    if platform.libc_ver()[0] != "glibc":  # not a CI machine here (all run glibc); the function must stay inert
        from fnclass.io import keep_freed_memory
        assert keep_freed_memory() is False
        return
    seen = json.loads(subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                                     check=True).stdout)
    if user_setting is None:
        assert seen == {"applied": True, "mapped": 0, "heap_kept_after_free": seen["heap_kept_after_free"]}, seen
        assert seen["heap_kept_after_free"] >= 20 << 20, seen  # the heap may have had a few MB free already
    else:
        assert not seen["applied"] and seen["mapped"] >= 24 << 20 and seen["heap_kept_after_free"] < 1 << 20, seen
