"""Evaluation: a trained model's metrics over a whole split, with airbench's test-time augmentation."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fnclass import data
from fnclass.core.losses import per_example_cross_entropy
from fnclass.training import calibration

TOP5_MIN_CLASSES = 5  # top-5 accuracy is reported with more classes than this (with 5 or fewer it is always 1)


def tta_logits(eval_step: Callable, params, state, images: torch.Tensor, level: int,
               logits: torch.Tensor | None = None) -> torch.Tensor:
    """Logits averaged over test-time views of a normalised NCHW batch (airbench's test-time augmentation).

    Level 1 averages the image and its mirror; level 2 gives that pair half the weight and the pairs
    shifted by one pixel up-left and down-right (reflect padding) the other half. ``logits``, when given,
    are the plain view's (already computed), so that view is not run again.
    """
    def pair(views, plain=None):
        plain = eval_step(params, state, views) if plain is None else plain
        return 0.5 * (plain + eval_step(params, state, views.flip(3)))

    logits = pair(images, logits)
    if level >= 2:
        height, width = images.shape[2:]
        padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
        logits = 0.5 * logits + 0.25 * (pair(padded[:, :, :height, :width]) + pair(padded[:, :, 2:, 2:]))
    return logits


def evaluate_dataset(eval_step: Callable, params, state, images: torch.Tensor, labels: torch.Tensor, *,
                     mean, std, batch_size: int, tta: int = 0, process=None) -> dict:
    """Logits-based metrics over a whole uint8 split: loss, accuracy, per-class accuracy (and TTA accuracy), and
    calibration (:mod:`fnclass.training.calibration`): ``nll`` (equal to ``loss``: evaluation has no label
    smoothing), ``ece``, ``brier`` and the ``reliability`` table, of the plain view's logits.

    With more than 5 classes (CIFAR-100), also ``top5_accuracy``: the share whose label is among the 5 highest
    logits (of the plain view).

    ``tta`` is the :func:`tta_logits` level (0: off; 1: flips; 2: flips and translations). Returns a dict
    of Python numbers plus ``predictions`` (an int64 tensor on the CPU).
    """
    return evaluate_members(eval_step, [(params, state)], images, labels, mean=mean, std=std,
                            batch_size=batch_size, tta=tta, process=process)["members"][0]


def evaluate_members(eval_step: Callable, models: list, images: torch.Tensor, labels: torch.Tensor, *,
                     mean, std, batch_size: int, tta: int = 0, process=None, temperature: float = 1.0,
                     progress: Callable | None = None) -> dict:
    """:func:`evaluate_dataset` for each of several ``(params, state)`` and for their ensemble.

    The ensemble's logits are the mean of the members' logits (and its TTA logits the mean of theirs). With a
    data-parallel ``process`` (:mod:`fnclass.distributed`) each process evaluates a contiguous shard of the split
    and the per-image results are gathered, so every process returns the metrics of the whole split.
    ``temperature`` divides the logits of the model the file stands for (the ensemble's with two or more models,
    else the one model's) before loss and calibration; the members' own stay as they are. ``progress(done, total)``
    is called after each batch with the images done (of this process's shard).

    Returns:
      ``{"members": [metrics of each], "ensemble": metrics of the mean logits}`` (the ensemble's only when
      there are two or more models).
    """
    from fnclass.distributed import gather_rows, split_rows

    count = len(models)
    kinds = {"loss": torch.float32, "prediction": torch.int64, "top5": torch.bool, "tta": torch.int64,
             "confidence": torch.float64, "brier": torch.float64, "nonfinite": torch.bool}
    rows = [{kind: [] for kind in kinds} for _ in range(count + 1)]
    local_images, local_labels = split_rows(images, process), split_rows(labels, process)
    for start in range(0, len(local_images), batch_size):
        x = data.normalize(local_images[start:start + batch_size], mean, std)
        y = local_labels[start:start + batch_size]
        batch_logits, batch_tta = [], []
        for params, state in models:
            logits = eval_step(params, state, x)
            batch_logits.append(logits)
            if tta:
                batch_tta.append(tta_logits(eval_step, params, state, x, tta, logits))
        if count > 1:
            batch_logits.append(torch.stack(batch_logits).mean(dim=0))
            batch_tta += [torch.stack(batch_tta).mean(dim=0)] if tta else []
        if temperature != 1.0:
            batch_logits[-1] = batch_logits[-1] / temperature
        for i, logits in enumerate(batch_logits):
            rows[i]["loss"].append(per_example_cross_entropy(logits, y))
            rows[i]["prediction"].append(logits.argmax(dim=-1))
            calibrated = calibration.per_example(logits, y)
            rows[i]["confidence"].append(calibrated["confidence"])
            rows[i]["brier"].append(calibrated["brier"])
            if logits.shape[-1] > TOP5_MIN_CLASSES:
                rows[i]["top5"].append((logits.topk(5, dim=-1).indices == y[:, None]).any(dim=-1))
            nonfinite = ~torch.isfinite(logits).all(dim=-1)  # an image whose logits (any view's) are nan or inf
            if tta:
                rows[i]["tta"].append(batch_tta[i].argmax(dim=-1))
                nonfinite |= ~torch.isfinite(batch_tta[i]).all(dim=-1)
            rows[i]["nonfinite"].append(nonfinite)
        if progress:
            progress(start + len(y), len(local_images))

    def whole(parts: list, kind: str) -> torch.Tensor:
        local = torch.cat(parts) if parts else torch.empty(0, dtype=kinds[kind], device=images.device)
        return gather_rows(local, len(labels), process)

    top5 = any(part["top5"] for part in rows) or (process is not None and _more_than_five(
        models, eval_step, images, mean, std))  # a process with an empty shard must still join the gather
    results = [_metrics(whole(r["loss"], "loss"), whole(r["prediction"], "prediction"), labels,
                        whole(r["tta"], "tta") if tta else None, whole(r["top5"], "top5") if top5 else None,
                        {kind: whole(r[kind], kind) for kind in ("confidence", "brier")},
                        whole(r["nonfinite"], "nonfinite"))
               for r in rows[:count + (count > 1)]]
    return {"members": results[:count], "ensemble": results[count] if count > 1 else None}


def split_logits(eval_step: Callable, models: list, images: torch.Tensor, *, mean, std,
                 batch_size: int) -> torch.Tensor:
    """The logits of a whole uint8 split (the mean of the models' logits: an ensemble's), float32 on the CPU."""
    parts = []
    for start in range(0, len(images), batch_size):
        x = data.normalize(images[start:start + batch_size], mean, std)
        parts.append(torch.stack([eval_step(params, state, x).float() for params, state in models]).mean(dim=0))
    return torch.cat(parts).cpu() if parts else torch.empty(0)


def _more_than_five(models: list, eval_step: Callable, images: torch.Tensor, mean, std) -> bool:
    """Whether the models have more than 5 classes (a process whose shard is empty cannot tell from its rows)."""
    params, state = models[0]
    return eval_step(params, state, data.normalize(images[:1], mean, std)).shape[-1] > TOP5_MIN_CLASSES


def _metrics(losses: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor,
             tta_predictions: torch.Tensor | None, top5_hits: torch.Tensor | None, rows: dict,
             nonfinite: torch.Tensor) -> dict:
    """Loss, accuracy, per-class accuracy, calibration (and TTA and top-5 accuracy) of one model over a split, and
    ``nonfinite_logits``: how many images had a nan or inf logit in any view."""
    correct = predictions == labels
    per_class = torch.zeros(int(labels.max()) + 1, device=labels.device).index_add_(0, labels, correct.float())
    counts = torch.bincount(labels, minlength=len(per_class)).clamp(min=1)
    result = {"loss": losses.sum().item() / len(labels), "accuracy": correct.float().mean().item(),
              "per_class_accuracy": (per_class / counts).tolist(), "predictions": predictions.cpu(),
              **calibration.summarize({"nll": losses, "correct": correct, **rows}),
              "nonfinite_logits": int(nonfinite.sum())}
    if top5_hits is not None:
        result["top5_accuracy"] = top5_hits.float().mean().item()
    if tta_predictions is not None:
        result["tta_accuracy"] = (tta_predictions == labels).float().mean().item()
    return result


def split_metrics(result: dict, split: str) -> dict:
    """An evaluation's numbers under the split's names: ``val_loss``, ``val_accuracy``, ``val_top5_accuracy``..."""
    names = {"loss": "loss", "accuracy": "accuracy", "top5_accuracy": "top5_accuracy", "tta_accuracy": "accuracy_tta",
             "nll": "nll", "ece": "ece", "brier": "brier"}
    return {f"{split}_{name}": result[key] for key, name in names.items() if key in result}
