"""fnclass's model zoo: pretrained inference weights shipped with the package, one model card per entry.

Each entry is two files in this folder: ``<name>.json``, the model card (format ``fnclass.zoo/1``), and the
safetensors export it names (written by ``fnclass export --format safetensors``). The card records where the
weights came from (data and its checksums, config, seed, date, machine, torch version), the test accuracy
measured with the shipped file, and the file's SHA-256, which is checked before the weights are read. Adding an
entry is adding those two files: nothing here lists names.

    import fnclass
    model = fnclass.pretrained("cifar10-cpu")
    logits = model.logits(uint8_images)  # (N, 32, 32, 3) uint8 -> (N, 10) float32
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fnclass.errors import InputError

if TYPE_CHECKING:  # torch loads only when weights do
    import torch

    from fnclass.run.export import Exported

FOLDER = Path(__file__).parent
FORMAT = "fnclass.zoo/1"
REQUIRED = ("name", "summary", "weights", "weights_sha256", "dtype", "model", "config", "seed", "data", "accuracy",
            "trained")


class ZooError(InputError):
    """An unknown zoo name, or a card or weights file that does not hold what it says."""


def cards(folder: str | Path | None = None) -> dict[str, dict]:
    """Every model card in ``folder``, by name (sorted)."""
    found = {}
    for path in sorted(_folder(folder).glob("*.json")):
        card = _read_card(path)
        found[card["name"]] = card
    return found


def card(name: str, folder: str | Path | None = None) -> dict:
    """The model card of ``name``; a one-line error listing the zoo when there is no such entry."""
    known = cards(folder)
    if name not in known:
        raise ZooError(f"no pretrained model named {name!r}; the zoo has {', '.join(known) or 'nothing'} "
                       "(see `fnclass models`)")
    return known[name]


def weights_path(name: str, folder: str | Path | None = None) -> Path:
    """The verified weights file of entry ``name`` (its SHA-256 checked against the card)."""
    from fnclass.data import file_sha256

    entry = card(name, folder)
    path = _folder(folder) / entry["weights"]
    if not path.is_file():
        raise ZooError(f"{path}: the weights of {name!r} are missing from this installation; reinstall fnclass")
    if file_sha256(path) != entry["weights_sha256"]:
        raise ZooError(f"{path}: its SHA-256 differs from the model card's; the file was altered: reinstall fnclass")
    return path


def pretrained(name: str, *, dtype: torch.dtype | None = None, folder: str | Path | None = None) -> Exported:
    """Load a pretrained model of the zoo, as :func:`fnclass.load_exported` loads an export.

    Args:
      name: a zoo entry (``fnclass models`` lists them), e.g. ``"cifar10-cpu"``.
      dtype: the dtype to compute in; default float32 (weights stored in float16 are widened, which is how
        the card's accuracy was measured).
      folder: where the cards live (default: the package's zoo, :data:`FOLDER`).

    Returns:
      An :class:`fnclass.run.export.Exported`; ``logits(images)`` takes uint8 (N, H, W, 3) images.

    Raises:
      ZooError: an unknown name, or weights that do not match their card.
    """
    import torch

    from fnclass.core.tree import tree_map
    from fnclass.run.export import load_exported

    exported = load_exported(weights_path(name, folder))
    dtype = torch.float32 if dtype is None else dtype
    cast = lambda leaf: leaf.to(dtype) if leaf.is_floating_point() else leaf
    return exported._replace(params=tree_map(cast, exported.params), state=tree_map(cast, exported.state),
                             dtype=dtype)


def predictor(name: str, folder: str | Path | None = None):
    """Entry ``name`` as an :class:`fnclass.run.export.Predictor` (what ``fnclass predict --model`` runs)."""
    from fnclass.run.export import Predictor

    model = pretrained(name, folder=folder)
    return Predictor(model.calibrated_logits, model.classes, model.input_size, "pretrained",
                     model.metadata.get("weights", "raw"))


def _folder(folder: str | Path | None) -> Path:
    """``folder``, or the package's zoo (looked up at call time, so tests can point it elsewhere)."""
    return Path(folder) if folder is not None else FOLDER


def _read_card(path: Path) -> dict:
    """One model card, checked for the fields every entry must have."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ZooError(f"{path}: not a readable model card ({error}); reinstall fnclass") from None
    missing = [key for key in REQUIRED if key not in entry] if isinstance(entry, dict) else list(REQUIRED)
    if missing or entry.get("format") != FORMAT or entry.get("name") != path.stem:
        raise ZooError(f"{path}: not a {FORMAT} model card named {path.stem!r} (missing {', '.join(missing) or '-'})"
                       "; reinstall fnclass")
    return entry


__all__ = ["FOLDER", "FORMAT", "ZooError", "card", "cards", "predictor", "pretrained", "weights_path"]
