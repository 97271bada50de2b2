"""Make (or remake) an entry of fnclass's model zoo from a finished run: export, measure, write the model card.

Run by hand from the repository root, once the run is chosen::

    python -m benchmarks.zoo_entry runs/cpu --name cifar10-cpu --config-name cpu --wall 9m41s \
      --summary "tiny net, configs/cpu.toml, 10 minutes on a 2-core CPU" --data-dir ../shared/data/cifar10

It exports the run's checkpoint (``--checkpoint``, default ``last``: the end of the run; ``best`` was chosen on
the test set) as a safetensors inference file in each of float32 and float16, evaluates both on the full test
split exactly as ``fnclass eval --model NAME --tta`` will (weights widened to float32), keeps float16 when it
loses nothing (at most ``--tolerance`` points, with and without TTA) and float32 otherwise, and writes
``fnclass/run/zoo/NAME.safetensors`` and ``fnclass/run/zoo/NAME.json`` (the model card). The card's accuracies are those
of the shipped file; tests/test_zoo.py requires them to 0.01 points.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch

from fnclass.core.tree import num_params
from fnclass.data import file_sha256, load_split
from fnclass.io import write_atomic
from fnclass.run import zoo
from fnclass.run.export import export_checkpoint, load_for_evaluation
from fnclass.training.evaluate import evaluate_members
from fnclass.training.step import make_eval_step

DATA_FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy", "classes.txt")


def measure(path: Path, data_dir: Path) -> dict:
    """Test accuracy of an exported file without and with its TTA, as ``fnclass eval --tta`` computes them."""
    ckpt = load_for_evaluation(path)
    images, labels = load_split(data_dir, "test")
    ckpt.check_split(data_dir, images, labels)
    result = evaluate_members(make_eval_step(ckpt.model), [(ckpt.params, ckpt.state)], images, labels,
                              mean=ckpt.mean, std=ckpt.std, batch_size=ckpt.config.train.eval_batch_size,
                              tta=1 + ckpt.config.train.tta_translate)["members"][0]
    return {"test": result["accuracy"], "test_tta": result["tta_accuracy"], "test_images": len(labels)}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--checkpoint", default="last", help="which checkpoint of the run: last or best")
    parser.add_argument("--config-name", required=True, help="the shipped config the run used, e.g. cpu")
    parser.add_argument("--summary", required=True, help="one line for `fnclass models`")
    parser.add_argument("--wall", required=True, help="wall time of the whole `fnclass train` command")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--tolerance", type=float, default=0.0001, help="accuracy float16 may lose (fraction)")
    parser.add_argument("--folder", type=Path, default=zoo.FOLDER)
    args = parser.parse_args()

    source = args.run_dir / "checkpoints" / f"{args.checkpoint}.safetensors"
    summary = json.loads((args.run_dir / "summary.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        measured = {}
        for dtype in ("float32", "float16"):
            out = Path(scratch) / f"{dtype}.safetensors"
            export_checkpoint(source, out, format="safetensors", dtype=dtype)
            measured[dtype] = (out, measure(out, args.data_dir))
            print(dtype, measured[dtype][1])
        full, half = measured["float32"][1], measured["float16"][1]
        keep = "float16" if all(full[k] - half[k] <= args.tolerance for k in ("test", "test_tta")) else "float32"
        weights = args.folder / f"{args.name}.safetensors"
        write_atomic(weights, measured[keep][0].read_bytes())
    accuracy = measured[keep][1]
    widened = " widened to float32" if keep != "float32" else ""
    ckpt = load_for_evaluation(weights)
    card = {
        "format": zoo.FORMAT,
        "name": args.name,
        "summary": args.summary,
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
        "weights_bytes": weights.stat().st_size,
        "dtype": keep,
        "model": ckpt.config.model.name,
        "parameters": num_params(ckpt.params),
        "config": args.config_name,
        "seed": ckpt.config.train.seed,
        "checkpoint": f"{args.checkpoint} (step {ckpt.step})",
        "data": {
            "dataset": ckpt.config.data.dataset,
            "copy": "the JPEG-quality-75 copy of CIFAR-10 (../shared/data/cifar10; about 3 points under the "
                    "original's accuracies)",
            "train_images": summary["train_images"], "test_images": summary["test_images"],
            "sha256": {name: file_sha256(args.data_dir / name) for name in DATA_FILES},
        },
        "accuracy": {"test": accuracy["test"], "test_tta": accuracy["test_tta"],
                     "tta": "flips and one-pixel translations" if ckpt.config.train.tta_translate else "flips",
                     "float32_test": full["test"], "float32_test_tta": full["test_tta"],
                     "measured_with": f"the shipped {keep} weights{widened} on "
                                      f"the {accuracy['test_images']:,} test images (fnclass eval --model)"},
        "trained": {"date": datetime.date.today().isoformat(), "device": summary["device"], "machine": cpu_name(),
                    "cores": torch.get_num_threads(), "torch": summary["torch_version"],
                    "python": platform.python_version(), "fnclass": summary["fnclass_version"],
                    "train_seconds": round(summary["train_seconds"], 1), "wall": args.wall},
    }
    write_atomic(args.folder / f"{args.name}.json", (json.dumps(card, indent=2) + "\n").encode())
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
