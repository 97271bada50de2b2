"""Export a trained checkpoint in every format and dtype; test accuracy, logit differences and file sizes.

Run by hand, not by pytest::

    python -m benchmarks.export_accuracy runs/cpu/checkpoints/last.safetensors --data-dir ../shared/data/cifar10

Each export is read back the way ``fnclass predict`` reads it (``fnclass.run.export.load_predictor``) and run
on the whole test split; the table compares it with the checkpoint itself.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fnclass.data import load_split
from fnclass.run import export

COMBINATIONS = [(fmt, dtype) for fmt in export.FORMATS for dtype in export.DTYPES
                if not (fmt == "onnx" and dtype == "bfloat16")]


def logits_of(predictor, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Float32 logits of a whole split, batch by batch."""
    with torch.no_grad():
        return torch.cat([predictor.logits(images[i:i + batch]) for i in range(0, len(images), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args()
    images, labels = load_split(Path(args.data_dir), "test")
    reference = logits_of(export.load_predictor(args.checkpoint), images)
    base = (reference.argmax(1) == labels).double().mean().item()
    rows = [{"format": "checkpoint", "dtype": "float32", "bytes": Path(args.checkpoint).stat().st_size,
             "accuracy": base, "max_abs_logit_diff": 0.0, "changed_predictions": 0, "seconds": 0.0}]
    with tempfile.TemporaryDirectory() as folder:
        for fmt, dtype in COMBINATIONS:
            out = Path(folder) / f"model.{dtype}.{fmt}"
            export.export_checkpoint(args.checkpoint, out, format=fmt, dtype=dtype)
            start = time.perf_counter()
            logits = logits_of(export.load_predictor(out, trust_program=True), images)
            rows.append({"format": fmt, "dtype": dtype, "bytes": out.stat().st_size,
                         "accuracy": (logits.argmax(1) == labels).double().mean().item(),
                         "max_abs_logit_diff": (logits - reference).abs().max().item(),
                         "changed_predictions": int((logits.argmax(1) != reference.argmax(1)).sum()),
                         "seconds": time.perf_counter() - start})
    print(f"{'format':<12}{'dtype':<10}{'bytes':>11}{'accuracy':>10}{'delta pts':>10}{'max |dlogit|':>14}"
          f"{'changed':>9}{'seconds':>9}")
    for row in rows:
        print(f"{row['format']:<12}{row['dtype']:<10}{row['bytes']:>11,}{row['accuracy']:>10.2%}"
              f"{100 * (row['accuracy'] - base):>+10.2f}{row['max_abs_logit_diff']:>14.2e}"
              f"{row['changed_predictions']:>9}{row['seconds']:>9.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "images": len(labels), "rows": rows,
                                              "torch_version": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
