"""Robustness: a model's accuracy and calibration on every corruption and severity of a corruption folder.

The folder is one :mod:`fnclass.data.corruptions` builds (the layout of CIFAR-10-C). For each corruption and
severity: accuracy, NLL, ECE (15 bins) and Brier score of the model's logits (divided by its temperature, when the
checkpoint carries one); their means over severities, over corruptions, and over all 15 x 5 sets (the figure
papers report as "CIFAR-10-C accuracy / NLL").
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from fnclass.data.corruptions import CorruptionSet
from fnclass.training.calibration import calibration_metrics

METRICS = ("accuracy", "nll", "ece", "brier")


def evaluate_corruptions(logits_of: Callable[[torch.Tensor], torch.Tensor], corruption_set: CorruptionSet, *,
                         temperature: float = 1.0, batch_size: int = 1000, progress=None) -> dict:
    """Evaluate a model on every corruption and severity of a corruption folder.

    Args:
      logits_of: uint8 (B, H, W, 3) CPU images -> float32 logits (e.g. a checkpoint's ``logits`` on a device).
      corruption_set: the folder, opened with :func:`fnclass.data.corruptions.read_corruption_set`.
      temperature: divides the logits before the calibration metrics.
      batch_size: images per call of ``logits_of``.
      progress: called with ``(done, total)`` after each corruption.

    Returns:
      ``{"rows": [{"corruption", "severity", "accuracy", "nll", "ece", "brier"}, ...], "by_corruption": {name:
      means}, "by_severity": {severity: means}, "mean": means over every row, "images": N}``.
    """
    labels = torch.from_numpy(corruption_set.labels)
    count, rows = corruption_set.images, []
    for done, name in enumerate(corruption_set.corruptions, start=1):
        images = torch.from_numpy(corruption_set.load(name))
        for block, severity in enumerate(corruption_set.severities):
            part = images[block * count:(block + 1) * count]
            with torch.no_grad():
                logits = torch.cat([logits_of(part[i:i + batch_size]).float().cpu()
                                    for i in range(0, count, batch_size)])
            metrics = calibration_metrics(logits, labels, temperature)
            rows.append({"corruption": name, "severity": severity, **{k: metrics[k] for k in METRICS}})
        if progress is not None:
            progress(done, len(corruption_set.corruptions))
    means = lambda chosen: {k: statistics.fmean(r[k] for r in chosen) for k in METRICS}
    return {"rows": rows, "images": count, "temperature": temperature,
            "by_corruption": {name: means([r for r in rows if r["corruption"] == name])
                              for name in corruption_set.corruptions},
            "by_severity": {severity: means([r for r in rows if r["severity"] == severity])
                            for severity in corruption_set.severities},
            "mean": means(rows)}


def plot_corruptions(path: str | Path, result: dict, title: str, clean: dict | None = None) -> None:
    """A PNG of accuracy and ECE per corruption (one line per severity), and their means against severity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fnclass.io import save_figure

    names = list(result["by_corruption"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [3, 3, 1.4]})
    for ax, metric in zip(axes[:2], ("accuracy", "ece")):
        for severity in result["by_severity"]:
            values = [next(r[metric] for r in result["rows"] if r["corruption"] == n and r["severity"] == severity)
                      for n in names]
            ax.plot(range(len(names)), values, marker="o", label=f"severity {severity}",
                    color=plt.cm.viridis((int(severity) - 1) / 4))
        if clean is not None:
            ax.axhline(clean[metric], color="black", linestyle="--", linewidth=1, label="clean test")
        ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=60, ha="right", fontsize=8)
        ax.set(ylabel=metric.upper() if metric == "ece" else metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    severities = [int(s) for s in result["by_severity"]]
    axes[2].plot(severities, [m["accuracy"] for m in result["by_severity"].values()], marker="o", label="accuracy")
    axes[2].plot(severities, [m["ece"] for m in result["by_severity"].values()], marker="s", label="ECE")
    axes[2].set(xlabel="severity", xticks=severities, title="mean over corruptions")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
