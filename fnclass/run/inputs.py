"""A run's input files, fingerprinted when it starts and checked when it resumes.

The inputs are the data folder's five files, ``data.train_indices``, ``data.train_weights`` and
``train.init_from``. A run records each one's size, modification time and SHA-256 in ``inputs.json`` (and in
summary.json); ``--resume`` compares them with the files there now and refuses, before anything is written, when
one is missing or its bytes differ: a resumed run that trained on other data would contradict its own config.toml.

The check is cheap (see benchmarks/RESULTS.md, "Issue 30"): a file with the recorded size and modification time is
taken as unchanged, as ``git status`` and ``rsync`` take it; only a file whose time changed (a copied or restored
folder) is hashed again, and passes when its bytes are the same. The SHA-256 of the data folder's listing
(``data_sha256_all``) is the one ``fnclass data info`` prints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fnclass.config import Config
from fnclass.data import FILES, file_sha256, listing_sha256
from fnclass.errors import InputError

INPUTS_FILE = "inputs.json"
FORMAT = 1


class InputChanged(InputError):
    """An input of a run changed (or went missing) between the run and its ``--resume``."""


def _fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def _named_files(config: Config, data_folder: Path) -> list[tuple[str, Path]]:
    """``(input, path)`` for every file the run reads: the data folder's, then the config's own."""
    files = [("data", Path(data_folder) / name) for name in FILES]
    for key, value in (("data.train_indices", config.data.train_indices),
                       ("data.train_weights", config.data.train_weights), ("train.init_from", config.train.init_from)):
        if value is not None:
            files.append((key, Path(value)))
    return files


def fingerprint_inputs(config: Config, data_folder: str | Path) -> dict:
    """The record of a run's inputs (written to inputs.json): each file's size, modification time and SHA-256.

    A file that is not there is left out: the run cannot start without it, and its loader says why in one line.
    """
    files = []
    for name, path in _named_files(config, Path(data_folder)):
        if path.is_file():
            files.append({"input": name, "path": str(path), **_fingerprint(path)})
    data = {Path(f["path"]).name: f["sha256"] for f in files if f["input"] == "data"}
    return {"format": FORMAT, "data_folder": str(Path(data_folder).resolve()),
            "data_sha256_all": listing_sha256(data) if len(data) == len(FILES) else None, "files": files}


def read_inputs(run_dir: str | Path) -> dict | None:
    """A run's recorded inputs, or None for a run started before fnclass recorded them."""
    path = Path(run_dir) / INPUTS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT or not isinstance(record.get("files"), list):
            raise ValueError("unknown format")
        return record
    except (OSError, ValueError, AttributeError) as error:
        raise InputChanged(f"{path} is unreadable ({error}); it records the inputs the run started with: restore it "
                           "from a backup, or start a new run with --out") from None


def check_inputs(record: dict, config: Config, data_folder: str | Path, *, action: str = "--resume") -> None:
    """Raise :class:`InputChanged` (one line: ``action``, which input, what changed, the fix) unless every input
    recorded when the run started is there now with the same bytes; the data folder may have moved
    (``--data-dir``)."""
    recorded = {(f["input"], Path(f["path"]).name if f["input"] == "data" else f["path"]): f
                for f in record["files"]}
    for name, path in _named_files(config, Path(data_folder)):
        key = (name, path.name if name == "data" else str(path))
        was = recorded.pop(key, None)
        what = f"data folder file {path}" if name == "data" else f"{name} file {path}"
        fix = ("put the original back (its SHA-256 is in inputs.json), or start a new run with --out: a resumed or "
               "replayed run trains on the inputs it started with")
        if was is None:
            raise InputChanged(f"{action}: the run did not record {what} as an input; start a new run with --out")
        try:
            stat = os.stat(path)
        except OSError:
            raise InputChanged(f"{action}: {what} is missing (the run started with it); {fix}") from None
        if stat.st_size != was["bytes"]:
            raise InputChanged(f"{action}: {what} changed since the run started ({stat.st_size} bytes now, "
                               f"{was['bytes']} then); {fix}")
        if stat.st_mtime_ns != was["mtime_ns"]:  # rewritten, or copied: the bytes decide
            now = file_sha256(path)
            if now != was["sha256"]:
                raise InputChanged(f"{action}: {what} changed since the run started (SHA-256 {now[:12]}... now, "
                                   f"{was['sha256'][:12]}... then); {fix}")
    if recorded:
        name, path = next(iter(recorded))
        raise InputChanged(f"{action}: the run started with {name} {path}, which this run's config does not name; "
                           "start a new run with --out")


__all__ = ["INPUTS_FILE", "InputChanged", "check_inputs", "fingerprint_inputs", "read_inputs"]
