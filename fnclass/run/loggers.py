"""TensorBoard event files that mirror metrics.jsonl: a view of a run, never read back by fnclass.

metrics.jsonl stays the source of truth (resume, summaries and plots read it); a run's ``tb/`` folder can be
deleted at any time. The ``tensorboard`` package is an optional extra, imported only when a logger is created,
so ``fnclass --help`` loads neither it nor torch.
"""

from __future__ import annotations

from pathlib import Path

from fnclass.errors import InputError

MISSING_TENSORBOARD = "--logger tensorboard needs the tensorboard package: pip install 'fnclass[tensorboard]'"
COORDINATES = ("kind", "step", "epoch", "member")  # where a row belongs, not what it measured


def flatten_config(config_dict: dict) -> dict:
    """Nested sections as dotted keys: ``{"optim": {"lr": 0.2}}`` -> ``{"optim.lr": 0.2}`` (values unchanged)."""
    flat = {}
    for key, value in config_dict.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in flatten_config(value).items()})
        else:
            flat[key] = value
    return flat


def scalar_tags(row: dict) -> dict[str, float]:
    """The TensorBoard scalars of a metrics.jsonl row, by tag; they belong at global step ``row["step"]``.

    Every int or float field except the row's coordinates (kind, step, epoch, member) is kept, non-finite
    ones included (TensorBoard draws nan); bools, None, strings, lists and dicts are left out, except
    ``group_grad_norms`` of a ``grad_stats`` row. Tags: ``train/<name>`` for a ``step`` row
    (``member<i>/train/<name>`` when it is one member's), ``member<i>/<name>`` for a ``member_epoch`` row,
    ``grad_stats/group/<group>`` for the group norms, and ``<kind>/<name>`` otherwise (``epoch/test_accuracy``).
    """
    kind = row["kind"]
    values = {name: value for name, value in row.items() if name not in COORDINATES and _is_number(value)}
    if kind == "grad_stats":
        groups = row.get("group_grad_norms") or {}
        values.update({f"group/{group}": norm for group, norm in groups.items() if _is_number(norm)})
    if kind == "member_epoch":
        prefix = f"member{row['member']}/"
    elif kind == "step":
        prefix = f"member{row['member']}/train/" if "member" in row else "train/"
    else:
        prefix = f"{kind}/"
    return {prefix + name: value for name, value in values.items()}


class TensorBoardLogger:
    """Writes metrics.jsonl rows, and a run's config and final metrics, as TensorBoard events in ``log_dir``.

    Args:
      log_dir: the folder of event files (a run's ``RUN_DIR/tb``); created if missing.
      purge_step: None for a new run, which deletes the event files an earlier run left in ``log_dir`` (as a new
        run replaces metrics.jsonl). A resumed run passes the step it resumes from + 1: TensorBoard then hides
        the events earlier processes wrote at steps ``>= purge_step``, the rows metrics.jsonl dropped.

    Raises:
      InputError: when the tensorboard package is not installed.
    """

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] != "tensorboard":
                raise
            raise InputError(MISSING_TENSORBOARD) from None
        self.log_dir = Path(log_dir)
        if purge_step is None:
            for old in self.log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        # SummaryWriter writes the purge step as a session start. TensorBoard's server (its Python reader) takes a
        # folder's first session start for the first run's and purges nothing at it, so a new run writes one too.
        self._writer = SummaryWriter(str(self.log_dir), purge_step=0 if purge_step is None else purge_step)

    def row(self, row: dict) -> None:
        """Write the numbers of one metrics.jsonl row (see :func:`scalar_tags`), on disk when this returns."""
        for tag, value in scalar_tags(row).items():
            self._writer.add_scalar(tag, value, global_step=row["step"])
        self._writer.flush()  # as metrics.jsonl is: a killed run's view ends where its metrics do

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """Write the run's hyperparameters and final metrics for TensorBoard's HPARAMS tab.

        Args:
          hparams: the config as nested sections (``config_to_dict``) or already flat (``"optim.lr"``);
            numbers, bools and strings are kept, lists and tuples written as strings, None left out.
          metrics: the final results (summary.json); its int and float values, as scalars ``hparams/<name>``.
        """
        flat = {key: str(list(value)) if isinstance(value, (list, tuple)) else value
                for key, value in flatten_config(hparams).items() if value is not None}
        numbers = {f"hparams/{name}": value for name, value in metrics.items() if _is_number(value)}
        # Through this run's own event file, as add_hparams does with a writer of its own: a second file would sort
        # by name before this one when both start in the same second, and this file's session start (step 0) would
        # then purge the hparams from TensorBoard's view.
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(flat, numbers):
            self._writer.file_writer.add_summary(summary, 0)
        for tag, value in numbers.items():
            self._writer.add_scalar(tag, value, 0)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


def _is_number(value) -> bool:
    """Whether ``value`` is an int or float (a bool is an int to Python, not a measurement here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["MISSING_TENSORBOARD", "TensorBoardLogger", "flatten_config", "scalar_tags"]
