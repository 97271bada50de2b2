"""Run an exported model in a Python that cannot import fnclass; write its logits as an .npy file.

Usage: python tests/run_without_fnclass.py MODEL IMAGES.npy OUT.npy

MODEL is a pt2 program (run with ``torch.export.load`` alone) or an exported safetensors file (read with
``safetensors`` and ``json``, run by the independent torch.nn implementation in ``tests/torch_reference.py``).
"""

import json
import sys
import types
from pathlib import Path

sys.modules["fnclass"] = None  # any `import fnclass...` from here on raises ImportError

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_reference  # noqa: E402


def run_pt2(path: str, images: torch.Tensor) -> torch.Tensor:
    """The exported program takes the uint8 images as stored and returns logits."""
    return torch.export.load(path).module()(images)


def run_safetensors(path: str, images: torch.Tensor) -> torch.Tensor:
    """Rebuild the model from the file's metadata and weights, normalise as the metadata says, run it."""
    with safetensors.safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        flat = {name: handle.get_tensor(name) for name in handle.keys()}
    model_config = types.SimpleNamespace(**json.loads(metadata["config"])["model"])
    dtype = getattr(torch, metadata["dtype"])
    weights = {name.split(".", 1)[1]: value for name, value in flat.items()}  # drop "params." / "state."
    module = torch_reference.load_flat(torch_reference.build_module(model_config).to(dtype), weights).eval()
    normalization = json.loads(metadata["normalization"])
    mean = torch.tensor(normalization["mean"], dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"], dtype=dtype).view(1, 3, 1, 1)
    x = (images.permute(0, 3, 1, 2).to(dtype) / 255.0 - mean) / std
    return module(x).float()


def main() -> None:
    model, images_path, out = sys.argv[1:4]
    images = torch.from_numpy(np.load(images_path, allow_pickle=False))
    run = run_pt2 if model.endswith(".pt2") else run_safetensors
    with torch.no_grad():
        logits = run(model, images)
    assert "fnclass" not in {name.split(".")[0] for name, mod in sys.modules.items() if mod is not None}
    np.save(out, logits.numpy(), allow_pickle=False)


if __name__ == "__main__":
    main()
