"""The smallest effects: atomic file writes, JSON, PNG figures, and device selection and synchronisation.

Every file fnclass writes goes through :func:`write_atomic` (or :func:`write_temp` plus ``os.replace`` for a
set of files): a temporary file beside the target, fsynced, then renamed, so an existing file is never left
half-written. Files get the umask's permissions, like any file a user's program writes.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import torch

from fnclass.errors import InputError


class DeviceError(InputError):
    """The device asked for is not available here."""


class WriteError(InputError):
    """A file could not be written (full disk, unwritable folder); the previous file, if any, is intact."""


def write_temp(path: str | Path, payload: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``payload`` (bytes, or a function writing to a binary handle) to a fresh hidden file beside ``path``.

    Returns:
      The temporary file's path; the caller renames it into place (``os.replace``) or removes it.
    """
    path = Path(path)
    temp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        # open(..., "xb") rather than tempfile.mkstemp: the file gets the umask's permissions, not 0600.
        with open(temp, "xb") as handle:
            if callable(payload):
                payload(handle)
            else:
                handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def write_atomic(path: str | Path, payload: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and a rename, both made durable."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = write_temp(path, payload)
        try:
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    except OSError as error:
        raise WriteError(f"cannot write {path}: {error.strerror or error}; free some space or choose a writable "
                         "folder (the previous file, if any, is intact)") from None
    fsync_folder(path.parent)


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries to disk, so that a rename in it survives a crash (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows, where folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


def read_small(path: str | Path, limit: int, error: type[InputError], what: str) -> bytes:
    """The bytes of a file that must be small (a config, a class list), or one line of ``error`` naming it.

    Reads at most ``limit + 1`` bytes, so a huge or endless file (a named pipe, /dev/zero) costs nothing.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as problem:
        raise error(f"{path}: cannot be read ({problem.strerror}); check its permissions") from None
    if len(raw) > limit:
        raise error(f"{path}: over {limit:,} bytes, which no {what} needs; is it the right file?")
    return raw


def write_json(path: str | Path, payload: dict) -> None:
    """Write a JSON file atomically (numbers that are not plain floats, such as tensors' items, as floats)."""
    write_atomic(path, (json.dumps(payload, indent=2, default=float) + "\n").encode())


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel at once.

    A training step allocates its new parameters, optimizer state and activations afresh (the step is pure), tens
    of MB a step; by default glibc serves blocks over its (dynamic) threshold with mmap and trims the heap's top,
    so every step faults the same amount of memory back in. Measured on a 2-core CPU: a third of a `cpu` run's
    time went to the kernel, and these two settings took 24-31% off training time (benchmarks/RESULTS.md).
    Peak memory is unchanged; freed memory (up to 512 MiB) is returned later rather than at once. Does nothing
    when the user set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` or the C library is not glibc.

    Returns:
      Whether the settings were applied.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in
                                                   ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20))
    except (OSError, AttributeError):
        return False


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    import torch  # here, not at the top: config reads files through this module, and `--help` imports no torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 matrix units, as torch's CPU capability checks report them: ``"AMX"`` (tiles),
    ``"AVX-512 BF16"``, or None (bf16 then runs emulated, slower than float32)."""
    import torch

    checks = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    for name, check in checks:  # private but stable since torch 2.3; missing on other builds: no units
        if getattr(torch.cpu, check, lambda: False)():
            return name
    return None


def _cpu_bf16_probe() -> None:
    """Run a convolution and a matrix product under CPU bf16 autocast (raises where this torch build cannot)."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.functional.conv2d(torch.ones(1, 3, 4, 4), torch.ones(2, 3, 3, 3))
        torch.nn.functional.linear(x.flatten(1), torch.ones(2, x[0].numel()))


def resolve_precision(precision: str, device: torch.device, *, units: Callable[[], str | None] | None = None,
                      probe: Callable[[], None] | None = None, name: str = "train.precision") -> tuple[str, str]:
    """The precision a run computes in, and why: ``train.precision`` with ``"auto"`` resolved.

    ``"auto"`` is ``"bf16"`` where the device has native bf16 matrix units (a CUDA device with bf16 support; a CPU
    with AMX or AVX-512 BF16, from ``units``) and ``"fp32"`` elsewhere, or always ``"fp32"`` with the environment
    variable ``FNCLASS_AUTO_PRECISION=fp32`` (the same numbers on every machine: the test suite sets it); it never
    fails on its own. ``"bf16"`` asked for on the
    CPU is checked by ``probe``. ``units`` and ``probe`` default to :func:`cpu_bf16_units` and a bf16 convolution
    and matrix product under CPU autocast (looked up when called, so a test can replace either).

    Raises:
      DeviceError: ``"bf16"`` on a CPU whose torch build cannot run bf16 autocast.
    """
    import torch

    if precision != "auto":
        if precision == "bf16" and device.type == "cpu":
            try:
                (probe or _cpu_bf16_probe)()
            except Exception as error:  # noqa: BLE001 - whatever the build raises, the answer is one line
                setting = name.startswith("train.")  # a config key's values are TOML strings; a flag's are not
                asked, fp32, auto = (f'{name} = "bf16"', '"fp32"', '"auto"') if setting else \
                    (f"{name} bf16", "fp32", "auto")
                raise DeviceError(f"{asked}: this torch build cannot run bf16 on the CPU "
                                  f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); use "
                                  f"{fp32}, or {auto} (which picks fp32 here)") from None
        return precision, name
    pinned = os.environ.get("FNCLASS_AUTO_PRECISION")
    if pinned:
        if pinned != "fp32":
            raise DeviceError(f"FNCLASS_AUTO_PRECISION={pinned}: the only value is fp32 (auto then always picks "
                              "fp32); unset it to let auto choose")
        return "fp32", "auto: FNCLASS_AUTO_PRECISION=fp32"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} computes in bf16 natively"
        return "fp32", f"auto: {torch.cuda.get_device_name(device)} has no native bf16"
    found = (units or cpu_bf16_units)()
    if found:
        return "bf16", f"auto: the CPU has {found} units"
    return "fp32", "auto: the CPU has no AMX or AVX-512 BF16 units"


AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(device_type: str, precision: str):
    """bf16 autocast on CUDA or the CPU, fp16 autocast on CUDA, when asked for; float32 otherwise (fp16 on the CPU,
    which has no loss-scaled path here)."""
    import contextlib

    import torch

    if precision == "bf16" and device_type in ("cuda", "cpu") or precision == "fp16" and device_type == "cuda":
        return torch.autocast(device_type=device_type, dtype=getattr(torch, AUTOCAST[precision]))
    return contextlib.nullcontext()


def in_precision(model, precision: str):
    """``model`` (a :class:`fnclass.models.Model`) whose ``apply`` computes under ``precision``'s autocast on its
    images' device and returns float32 logits (the loss and scores stay float32); ``"fp32"``: ``model`` itself.
    What the analysis commands' ``--precision`` runs; parameters and gradients stay float32."""
    if precision == "fp32":
        return model

    def apply(params, state, images, **kwargs):
        with autocast(images.device.type, precision):
            logits, new_state = model.apply(params, state, images, **kwargs)
        return logits.float(), new_state

    return model._replace(apply=apply)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a clock read after it then includes that work); nothing on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """A readable name of the device (the GPU's model on CUDA)."""
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"
