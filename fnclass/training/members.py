"""Members: K models of one run (``--seeds``, ``--sweep``), trained at once by :mod:`fnclass.training.program`.

What is particular to them lives here: their swept hyperparameters as tensors, their names, the ``member_epoch``
lines, the spread of their accuracies in epoch rows and the summary, and ``plots/members.png``.
"""

from __future__ import annotations

import statistics

import torch

from fnclass.config import SWEEPS
from fnclass.io import save_figure
from fnclass.run.directory import RunDirectory
from fnclass.training.evaluate import split_metrics


def member_name(member: dict) -> str:
    """``seed 3, optim.lr 0.2``: a member's seed and swept values."""
    return ", ".join(f"{key} {value}" for key, value in member.items())


def swept_values(members: list[dict]) -> dict[str, torch.Tensor]:
    """The swept hyperparameters, each a ``(K,)`` float32 tensor of the members' values (empty without a sweep)."""
    swept = [key for key in members[0] if key != "seed"]
    return {key: torch.tensor([m[key] for m in members], dtype=torch.float32) for key in swept}


def first(hyper: dict[str, torch.Tensor]) -> dict:
    """The first member's swept values (the optimizer state's structure is the same for every member)."""
    return {key: values[0] for key, values in hyper.items()}


def member_rows(members: list[dict], epoch: int, train_state, train_metrics: dict, evaluation: dict, split: str,
                lr: float, lr_scales: list[float]) -> list[dict]:
    """The ``member_epoch`` lines of metrics.jsonl: one per member, as a single run's epoch row (its EMA weights'
    metrics beside, with an EMA)."""
    rows = []
    for i, member in enumerate(members):
        scores = {}
        for prefix, result in evaluation.items():
            scores.update(split_metrics(result["members"][i], prefix + split))
        rows.append({"kind": "member_epoch", "member": i, "step": int(train_state.step[i]), "epoch": epoch + 1,
                     **member, "train_loss": train_metrics["loss"][i],
                     "train_accuracy": train_metrics["accuracy"][i], **scores,
                     "lr": lr * lr_scales[i], "skipped_steps": train_metrics["skipped_steps"][i]})
    return rows


def epoch_spread(members: list[dict], evaluation: dict, split: str) -> dict:
    """An epoch row's member fields: how many, the spread of their accuracies (and TTA accuracies), the groups of a
    sweep."""
    result = evaluation[""]
    accuracies = [m["accuracy"] for m in result["members"]]
    fields = {"members": len(members), **{f"{split}_accuracy_{k}": v for k, v in spread(accuracies).items()}}
    if any(k != "seed" for k in members[0]):
        fields["groups"] = _groups(members, accuracies)
    if "tta_accuracy" in result["ensemble"]:
        fields.update({f"{split}_accuracy_tta_{k}": v for k, v in
                       spread([m["tta_accuracy"] for m in result["members"]]).items()})
    return fields


def summary_members(members: list[dict], evaluation: dict, test: dict, split: str) -> dict:
    """summary.json's member fields: every member's test (and validation) metrics, their spread, a sweep's groups."""
    per_member = []
    for i, member in enumerate(members):
        entry = {"member": i, "seed": member["seed"], "hyperparameters": {k: v for k, v in member.items()
                                                                          if k != "seed"}}
        for prefix in test:
            entry.update(split_metrics(test[prefix]["members"][i], prefix + "test"))
            if split == "val":
                entry.update(split_metrics(evaluation[prefix]["members"][i], prefix + "val"))
        per_member.append(entry)
    accuracies = [m["test_accuracy"] for m in per_member]
    fields = {"members": per_member, **{f"test_accuracy_{k}": v for k, v in spread(accuracies).items()}}
    if any(k != "seed" for k in members[0]):
        fields["groups"] = _groups(members, accuracies)
    if "tta_accuracy" in test[""]["ensemble"]:
        fields["ensemble_test_accuracy_tta"] = test[""]["ensemble"]["tta_accuracy"]
        fields.update({f"test_accuracy_tta_{k}": v for k, v in
                       spread([m["test_accuracy_tta"] for m in per_member]).items()})
    return fields


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _groups(members: list[dict], accuracies: list[float]) -> list[dict]:
    """Accuracy spread over the seeds of each swept setting (a sweep's table groups by these)."""
    settings: dict[tuple, list[float]] = {}
    for member, accuracy in zip(members, accuracies):
        settings.setdefault(tuple((k, v) for k, v in member.items() if k != "seed"), []).append(accuracy)
    return [{"hyperparameters": dict(key), "members": len(values), **spread(values)}
            for key, values in settings.items()]


def plot_members(run: RunDirectory, members: list[dict]) -> None:
    """plots/members.png: each member's test accuracy per epoch, and the ensemble's."""
    if not run.writes:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows, key = run.member_rows(), run.selection
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, member in enumerate(members):
        mine = [r for r in rows if r["member"] == i and key in r]  # the evaluated epochs (train.eval_every)
        ax.plot([r["epoch"] for r in mine], [r[key] for r in mine], alpha=0.6, linewidth=1, marker=".",
                label=member_name(member) if len(members) <= 10 else None)
    epochs = [r for r in run.epoch_rows() if key in r]
    ax.plot([r["epoch"] for r in epochs], [r[key] for r in epochs], color="black", linewidth=2, marker="o",
            label="ensemble (mean logits)")
    ax.set(xlabel="epoch", ylabel=key.replace("_", " "), title=f"{len(members)} members")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    save_figure(fig, run.path / "plots" / "members.png")


__all__ = ["SWEEPS", "member_name", "spread", "swept_values"]
