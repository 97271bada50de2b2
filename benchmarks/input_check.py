"""What fingerprinting a run's inputs costs (issue 30): once when a run starts, and on every ``--resume``.

Three timings on a copy of the data folder in a temporary folder (the page cache warm: each file was read just
before, as a resumed run's data loading reads it anyway):

- ``record``: :func:`fnclass.run.inputs.fingerprint_inputs`, the SHA-256 of every file (a new run, once);
- ``resume, same files``: :func:`check_inputs` when sizes and modification times are as recorded (stat only);
- ``resume, copied folder``: the same bytes under new modification times (a copied or restored folder): every
  file is hashed again and passes.

Each is timed ``--rounds`` times; the table gives the median and range in milliseconds.

    python -m benchmarks.input_check --data-dir ../shared/data/cifar10 [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import device_name
from fnclass.config import Config
from fnclass.data import FILES
from fnclass.run.inputs import check_inputs, fingerprint_inputs


def _timed(function, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        tick = time.perf_counter()
        function()
        times.append((time.perf_counter() - tick) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("FNCLASS_DATA"), required="FNCLASS_DATA" not in os.environ)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    config = Config()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp) / "data"
        folder.mkdir()
        for name in FILES:
            shutil.copyfile(Path(args.data_dir) / name, folder / name)
        size = sum((folder / name).stat().st_size for name in FILES)
        record = fingerprint_inputs(config, folder)  # also warms the page cache

        def touched_check():
            for name in FILES:  # new modification times, same bytes
                os.utime(folder / name, ns=(time.time_ns(), time.time_ns()))
            check_inputs(record, config, folder)

        results = {"record (hash every file)": _timed(lambda: fingerprint_inputs(config, folder), args.rounds),
                   "resume, same files (stat)": _timed(lambda: check_inputs(record, config, folder), args.rounds),
                   "resume, copied folder (hash)": _timed(touched_check, args.rounds)}
    print(f"{device_name(torch.device('cpu'))}; data folder {size / 2**20:.0f} MiB ({', '.join(FILES)}); "
          f"{args.rounds} rounds")
    print(f"{'':32s} {'median ms':>10s}  range")
    for label, times in results.items():
        print(f"{label:32s} {statistics.median(times):10.2f}  {min(times):.2f}-{max(times):.2f}")


if __name__ == "__main__":
    main()
