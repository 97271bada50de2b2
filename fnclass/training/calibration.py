"""Calibration: how far a classifier's confidence is from its accuracy, and temperature scaling to close the gap.

* **NLL**: the mean negative log-likelihood of the true label (the evaluation loss: no label smoothing).
* **ECE**: the expected calibration error with 15 equal-width confidence bins and the L1 norm, the definition of
  torchmetrics' ``CalibrationError(task="multiclass", n_bins=15)``: the confidence is the highest softmax
  probability, bin ``b`` holds confidences in ``[b/15, (b+1)/15)`` (the last one also 1.0), and ECE is
  ``sum_b (n_b / N) |accuracy_b - confidence_b|``.
* **Brier score**: ``mean_i sum_c (p_ic - [y_i = c])^2`` (0 is perfect, 2 the worst; the multiclass form of
  Brier 1950, as uncertainty-baselines reports it).
* **Temperature scaling** (Guo et al. 2017): one scalar ``T`` dividing every logit, fitted by minimising the NLL
  of held-out logits. The accuracy does not change (the argmax is the same); the NLL of ``softmax(z / T)`` is
  convex in ``1 / T``, so a bracketed golden-section search over ``log T`` finds its minimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from fnclass.errors import InputError

ECE_BINS = 15  # torchmetrics' and uncertainty-baselines' default
TEMPERATURE_RANGE = (1e-2, 1e2)  # the search bracket; a minimum at either end is refused as a failed fit
_GOLDEN = (math.sqrt(5) - 1) / 2


class CalibrationError(InputError):
    """A temperature cannot be fitted: no held-out split, non-finite logits, or a minimum outside the bracket."""


def per_example(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Each example's NLL, confidence (highest probability), correctness and Brier score, shape (N,) each."""
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    probs = log_probs.exp()
    confidence, prediction = probs.max(dim=-1)
    one_hot = torch.nn.functional.one_hot(labels, logits.shape[-1]).double()
    return {"nll": -log_probs.gather(1, labels[:, None])[:, 0], "confidence": confidence,
            "correct": prediction == labels, "brier": ((probs - one_hot) ** 2).sum(dim=-1)}


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin: its ``lower`` edge, ``count``, mean ``confidence`` and ``accuracy`` (0 when empty)."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = (torch.bucketize(confidence.double(), edges[1:-1], right=True)).clamp(max=bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence.double()))
    total_confidence = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence.double())
    total_correct = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct.double())
    safe = count.clamp(min=1)
    return {"lower": edges[:-1].tolist(), "count": count.long().tolist(),
            "confidence": (total_confidence / safe).tolist(), "accuracy": (total_correct / safe).tolist()}


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean over confidence bins of |accuracy - confidence| (see the module docstring)."""
    table = reliability(confidence, correct, bins)
    total = sum(table["count"])
    return sum(n / total * abs(a - c) for n, a, c in zip(table["count"], table["accuracy"], table["confidence"]))


def summarize(rows: dict[str, torch.Tensor], bins: int = ECE_BINS) -> dict:
    """``nll``, ``ece``, ``brier`` and the ``reliability`` table from :func:`per_example`'s rows (of a whole split)."""
    return {"nll": rows["nll"].double().mean().item(), "ece": expected_calibration_error(
        rows["confidence"], rows["correct"], bins), "brier": rows["brier"].double().mean().item(),
        "reliability": reliability(rows["confidence"], rows["correct"], bins)}


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                        bins: int = ECE_BINS) -> dict:
    """Accuracy, NLL, ECE, Brier score and the reliability table of ``logits / temperature``.

    Args:
      logits: (N, classes) logits of a whole split.
      labels: (N,) int64 labels.
      temperature: divides the logits (1: as the model gives them).
      bins: ECE's equal-width confidence bins.

    Returns:
      ``{"accuracy", "nll", "ece", "brier", "reliability"}`` as Python numbers and lists.
    """
    rows = per_example(logits, labels, temperature)
    return {"accuracy": rows["correct"].double().mean().item(), **summarize(rows, bins)}


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """The mean NLL of ``softmax(logits / temperature)``, in float64."""
    return torch.nn.functional.cross_entropy(logits.double() / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, tolerance: float = 1e-6) -> float:
    """The temperature that minimises the NLL of held-out ``logits`` (golden-section search over ``log T``).

    Args:
      logits: (N, classes) logits of a held-out split (never the test split: the temperature would be fitted to
        the numbers it is then judged on).
      labels: (N,) int64 labels.
      tolerance: the bracket's final width in ``log T``.

    Returns:
      The fitted temperature (a Python float).

    Raises:
      CalibrationError: for an empty split, non-finite logits, or a minimum at the edge of ``TEMPERATURE_RANGE``.
    """
    if not len(labels):
        raise CalibrationError("no held-out images to fit a temperature on: hold out a validation split "
                               "(data.val_size)")
    if not torch.isfinite(logits).all():
        raise CalibrationError("the held-out logits are not all finite: the model diverged; a temperature cannot "
                               "be fitted (retrain it)")
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    loss = lambda log_t: nll(logits, labels, math.exp(log_t))
    a, b = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > tolerance:
        if loss_a <= loss_b:  # the minimum is in [low, b]
            high, b, loss_b = b, a, loss_a
            a = high - _GOLDEN * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + _GOLDEN * (high - low)
            loss_b = loss(b)
    temperature = math.exp((low + high) / 2)
    edge = min(abs(math.log(temperature) - math.log(t)) for t in TEMPERATURE_RANGE)
    if not math.isfinite(temperature) or edge < 10 * tolerance:
        raise CalibrationError(f"the fitted temperature ({temperature:g}) is at the edge of the search range "
                               f"{TEMPERATURE_RANGE}: the held-out logits carry no usable confidence (a constant "
                               "or untrained model?); retrain or evaluate without a temperature")
    return temperature


def plot_reliability(path: str | Path, tables: dict[str, dict], title: str) -> None:
    """A reliability diagram (PNG): accuracy against confidence per bin, one panel per table (e.g. before/after
    temperature scaling), the diagonal for perfect calibration and each bin's share of the images below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fnclass.io import save_figure

    fig, axes = plt.subplots(2, len(tables), figsize=(4.2 * len(tables), 5.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for column, (name, metrics) in enumerate(tables.items()):
        table, top, bottom = metrics["reliability"], axes[0][column], axes[1][column]
        width = 1 / len(table["lower"])
        centers = [lower + width / 2 for lower in table["lower"]]
        filled = [n > 0 for n in table["count"]]
        top.bar([c for c, f in zip(centers, filled) if f], [a for a, f in zip(table["accuracy"], filled) if f],
                width=width * 0.95, color="tab:blue", label="accuracy")
        top.bar([c for c, f in zip(centers, filled) if f],
                [conf - acc for conf, acc, f in zip(table["confidence"], table["accuracy"], filled) if f],
                bottom=[a for a, f in zip(table["accuracy"], filled) if f], width=width * 0.95, color="tab:red",
                alpha=0.35, label="gap to confidence")
        top.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1)
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
                title=f"{name}\nECE {metrics['ece']:.4f}, NLL {metrics['nll']:.4f}")
        top.legend(loc="upper left", fontsize=8)
        total = max(sum(table["count"]), 1)
        bottom.bar(centers, [n / total for n in table["count"]], width=width * 0.95, color="tab:gray")
        bottom.set(xlabel="confidence (highest probability)", ylabel="share")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def fit_report(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], *,
               weights: str) -> tuple[dict, dict]:
    """Fit a temperature to ``logits["val"]`` and measure every split before and after it.

    Returns:
      ``(report, tables)``: ``report`` holds ``temperature``, ``weights``, ``fitted_on`` and, per split, NLL, ECE
      and Brier ``before`` and ``after`` (JSON, what a checkpoint records); ``tables`` the full metrics per split
      and state (with the reliability tables, for :func:`plot_reliability`).
    """
    temperature = fit_temperature(logits["val"], labels["val"])
    tables = {name: {when: calibration_metrics(logits[name], labels[name], t)
                     for when, t in (("before", 1.0), ("after", temperature))} for name in logits}
    report = {"temperature": temperature, "weights": weights, "fitted_on": f"val ({len(labels['val'])} images)",
              **{name: {when: {k: m[k] for k in ("accuracy", "nll", "ece", "brier")} for when, m in pair.items()}
                 for name, pair in tables.items()}}
    return report, tables


def fit_checkpoint(ckpt, path: str | Path, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                   device: torch.device, out: str | Path | None = None, batch_size: int = 1000,
                   progress: Callable | None = None) -> dict:
    """Fit a checkpoint's temperature on its validation split and record it in the file (``fnclass calibrate``).

    Args:
      ckpt: the loaded checkpoint (members: their ensemble, the mean of their logits, is calibrated).
      path: its file, rewritten atomically unless ``out`` is given.
      splits: ``{"val": (images, labels), ...}``: uint8 images; only ``"val"`` is fitted on, every split reported.
      device: where the model runs.
      out: write the calibrated checkpoint here instead.
      batch_size: images per forward pass.
      progress: ``progress(done, total)`` after each batch: images done over all splits.

    Returns:
      The report :func:`fit_report` gives, plus ``path`` (the file written).
    """
    from fnclass.core.tree import tree_to
    from fnclass.run.checkpoint import set_temperature

    moved = ckpt._replace(params=tree_to(ckpt.params, device), state=tree_to(ckpt.state, device))
    total, done, logits = sum(len(images) for images, _ in splits.values()), 0, {}
    with torch.no_grad():
        for name, (images, _) in splits.items():
            parts = []
            for i in range(0, len(images), batch_size):
                parts.append(moved.logits(images[i:i + batch_size].to(device)).cpu())
                done += len(parts[-1])
                if progress:
                    progress(done, total)
            logits[name] = torch.cat(parts)
    report, _ = fit_report(logits, {name: labels for name, (_, labels) in splits.items()}, weights=ckpt.weights)
    set_temperature(path, report["temperature"], weights=ckpt.weights, calibration=report, out=out)
    return {**report, "path": str(out if out is not None else path)}
