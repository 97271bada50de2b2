"""The run directory: every file a training run writes, and the reporter that shows its progress.

``RunDirectory`` owns ``config.toml``, ``inputs.json`` (the input files' fingerprints, see
:mod:`fnclass.run.inputs`), ``metrics.jsonl``, ``checkpoints/`` (``last``, ``best`` and the ``checkpoint.keep``
most recent epoch ends), ``summary.json``, ``plots/`` and, with ``train.logger = "tensorboard"``, ``tb/``
(TensorBoard events mirroring metrics.jsonl). Every write of a run goes through
it, so a run that must not write (another process of a data-parallel run) sets ``writes=False`` once. A writing
run holds an OS lock on ``.lock`` in the directory from :meth:`RunDirectory.start` to :meth:`RunDirectory.close`:
a second writer is refused, and the kernel releases the lock when the process dies, so a killed run never
blocks its own resume.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from fnclass.config import Config, config_to_dict, config_to_toml
from fnclass.errors import InputError
from fnclass.io import WriteError, fsync_folder, save_figure, write_atomic, write_json
from fnclass.run.checkpoint import CheckpointError, copy_checkpoint, read_train_state, save_checkpoint
from fnclass.run.inputs import INPUTS_FILE

LOCK_NAME = ".lock"


class RunLockedError(InputError):
    """Another process is writing this run directory."""


class Reporter:
    """Receives a run's progress. This base class is silent (``fnclass.train(..., reporter=Reporter())``); the CLI
    renders it with rich, :class:`PlainReporter` (``fnclass.train``'s default) prints plain lines. Subclass it and
    override any method to take the progress elsewhere (a logger, a notebook widget)."""

    def start(self, info: dict) -> None:
        """Called once with the run's facts (device, sizes, steps, resumed step)."""

    def step(self, info: dict) -> None:
        """Called after every step with ``step``, ``epoch``, ``epoch_step``, ``steps_per_epoch``, ``lr``,
        ``images_per_second`` and, on logging steps, ``loss``."""

    def epoch(self, row: dict) -> None:
        """Called after each epoch's evaluation with the metrics.jsonl row."""

    def end(self, summary: dict) -> None:
        """Called once with the summary.json contents."""


class PlainReporter(Reporter):
    """``fnclass.train``'s default: plain lines on ``stream`` (standard error) — the run's start, a step line every
    ``every_seconds``, each epoch's metrics and the summary's figures."""

    def __init__(self, stream=None, every_seconds: float = 30.0):
        self.stream, self.every = stream, every_seconds
        self.last = None
        self.loss = None

    def _print(self, text: str) -> None:
        import sys
        import time

        print(text, file=self.stream or sys.stderr, flush=True)
        self.last = time.perf_counter()

    def start(self, info: dict) -> None:
        cfg = info["config"]
        self._print(f"fnclass: training {cfg.model.name} on {info['device']} ({info['precision']}), "
                    f"{info['train_images']} training images, {info['steps_per_epoch']} steps/epoch x "
                    f"{cfg.train.epochs} epochs -> {info['workdir']}")

    def step(self, info: dict) -> None:
        import time

        self.loss = info.get("loss", self.loss)
        if self.last is not None and time.perf_counter() - self.last < self.every:
            return
        loss = f", loss {self.loss:.4f}" if self.loss is not None else ""
        self._print(f"epoch {info['epoch'] + 1} step {info['epoch_step']}/{info['steps_per_epoch']}: "
                    f"{info['images_per_second']:,.0f} images/s{loss}")

    def epoch(self, row: dict) -> None:
        shown = [f"{key.replace('_', ' ')} {row[key]:.2%}" if "accuracy" in key else f"{key.replace('_', ' ')} "
                 f"{row[key]:.4f}" for key in ("train_loss", "test_loss", "test_accuracy", "val_loss", "val_accuracy")
                 if key in row]
        self._print(f"epoch {row['epoch']}: {', '.join(shown)} ({row.get('seconds', 0):.1f} s)")

    def end(self, summary: dict) -> None:
        tta = f" ({summary['test_accuracy_tta']:.2%} with TTA)" if "test_accuracy_tta" in summary else ""
        self._print(f"done: test accuracy {summary['test_accuracy']:.2%}{tta}, {summary['train_seconds']:.1f} s of "
                    f"training -> {summary['run_dir']}")


class RunDirectory:
    """The files of one training run in ``workdir``, and the reporter its progress goes to.

    Args:
      workdir: the run directory (created when the run starts).
      config: the run's resolved config (written as config.toml, and into every checkpoint).
      reporter: receives progress; a silent :class:`Reporter` by default.
      writes: False to write nothing at all (the reporter is still called).
    """

    def __init__(self, workdir: str | Path, config: Config, *, reporter: Reporter | None = None, writes: bool = True):
        self.path, self.config = Path(workdir), config
        self.reporter, self.writes = reporter or Reporter(), writes
        self.checkpoints, self.metrics_path = self.path / "checkpoints", self.path / "metrics.jsonl"
        self._meta: dict = {}
        self._lock = None
        self._tensorboard = None  # a TensorBoardLogger with train.logger = "tensorboard"
        self.resumed_from: Path | None = None
        self.rejected: list[tuple[str, str]] = []
        self.progress: dict = {}
        self._new_secret = None  # a new private run's secret key, written to privacy.key by start()

    @property
    def last(self) -> Path:
        """The checkpoint a resumed run continues from."""
        return self.checkpoints / "last.safetensors"

    def restore(self, skeleton):
        """The TrainState of the newest checkpoint that verifies, shaped like ``skeleton``.

        ``last.safetensors`` first, then the kept ``step-*.safetensors``, newest first; ``self.resumed_from``
        names the file taken, ``self.progress`` its epoch sums so far, and ``self.rejected`` lists
        ``(file, reason)`` for those passed over.

        Raises:
          CheckpointError: when none verifies (naming why ``last`` failed).
        """
        kept = sorted(self.checkpoints.glob("step-*.safetensors"), reverse=True)
        self.rejected = []
        for path in [self.last, *kept]:
            try:
                train_state, self.progress = read_train_state(path, skeleton)
            except CheckpointError as error:
                self.rejected.append((path.name, str(error)))
                continue
            self.resumed_from = path
            return train_state
        raise CheckpointError(f"{self.path}: no checkpoint verifies ({self.rejected[0][1]}); start a new run"
                              if self.rejected else f"{self.path}: no checkpoint to resume from")

    def start(self, *, step: int, info: dict, classes, mean, std, input_size, members: list | None = None,
              inputs: dict | None = None) -> None:
        """Begin (``step == 0``) or continue a run: forget metrics logged after ``step``, write config.toml (and
        ``inputs``, the record of the input files, as inputs.json where there is none yet or the run begins).

        ``members`` (a run of stacked members) is recorded in every checkpoint's metadata.
        """
        self._meta = dict(config=self.config, classes=classes, mean=mean, std=std, input_size=input_size)
        if members is not None:
            self._meta["members"] = members
        if self.writes:
            self._acquire_lock()
            if self.config.train.logger == "tensorboard":  # before any file changes: the extra may be missing
                self._open_tensorboard(step)
            self._remove_stale_temporaries()
            if step:
                self._truncate_metrics(step)
                self._complete_epoch_end(step)
            else:
                self.metrics_path.unlink(missing_ok=True)
            self.path.mkdir(parents=True, exist_ok=True)
            if self._new_secret is not None:
                self._write_secret()
            write_atomic(self.path / "config.toml", config_to_toml(self.config).encode())
            if inputs is not None and (not step or not (self.path / INPUTS_FILE).exists()):
                write_json(self.path / INPUTS_FILE, inputs)
        self.reporter.start({**info, "config": self.config, "workdir": str(self.path)})

    def log(self, row: dict) -> None:
        """Append one line to metrics.jsonl (flushed, so a crash loses at most the line being written).

        A line cut short by a crash is dropped when the run resumes, with every line logged after the
        checkpoint it resumes from: the resumed run logs those steps again, once.
        """
        if self.writes:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            if self._tensorboard is not None:
                self._tensorboard.row(row)

    def step(self, info: dict) -> None:
        """Report a step's progress."""
        self.reporter.step(info)

    def save(self, train_state, progress: dict | None = None, learning_rate=None) -> None:
        """Write ``last.safetensors`` (with the epoch's sums so far, ``progress``, when saved mid-epoch; at an epoch
        end with the ``learning_rate`` TracIn weighs it by)."""
        if self.writes:
            save_checkpoint(self.last, train_state, progress=progress, learning_rate=learning_rate, **self._meta)

    def keeps_epoch(self, epoch: int) -> bool:
        """Whether epoch ``epoch``'s (1-based) checkpoint is kept for good (``checkpoint.every_epochs``)."""
        every = self.config.checkpoint.every_epochs
        return bool(every) and (epoch % every == 0 or epoch == self.config.train.epochs)

    def end_epoch(self, row: dict, train_state, *, best: bool, learning_rate=None) -> None:
        """Log an epoch's row, write ``last`` (and ``best`` when ``best``, and the kept copies), report the row.

        ``learning_rate``: the mean learning rate since the previous checkpoint kept for attribution, recorded in
        the checkpoint (see :func:`fnclass.run.checkpoint.save_checkpoint`)."""
        self.log(row)
        self.save(train_state, learning_rate=learning_rate)  # serialised once; the copies are the same bytes
        if self.writes and best and self.config.checkpoint.keep_best:
            copy_checkpoint(self.last, self.checkpoints / "best.safetensors")
        if self.writes and self.keeps_epoch(row["epoch"]):
            copy_checkpoint(self.last, self.checkpoints / f"epoch-{row['epoch']:04d}.safetensors")
        if self.writes and self.config.checkpoint.keep:
            step = int(train_state.step.reshape(-1)[0])  # stacked members step together
            copy_checkpoint(self.last, self.checkpoints / f"step-{step:08d}.safetensors")
            for old in sorted(self.checkpoints.glob("step-*.safetensors"))[:-self.config.checkpoint.keep]:
                old.unlink()
        self.reporter.epoch(row)

    def has_epoch_row(self, step: int) -> bool:
        """Whether metrics.jsonl holds the row of the epoch that ended at ``step``."""
        return any(row["step"] == step for row in self.epoch_rows())

    def epoch_rows(self) -> list[dict]:
        """The epoch rows logged in metrics.jsonl so far (a resumed run's earlier ones included)."""
        return [row for row in self._rows() if row.get("kind") == "epoch"]

    def member_rows(self) -> list[dict]:
        """The ``member_epoch`` lines logged in metrics.jsonl so far (a run of members)."""
        return [row for row in self._rows() if row.get("kind") == "member_epoch"]

    @property
    def selection(self) -> str:
        """The epoch-row metric ``best.safetensors`` is chosen on: validation accuracy when the run holds a split
        out (``data.val_size``), else test accuracy; the EMA weights' (``ema_val_accuracy``) when it keeps an EMA,
        as those are what eval and export use by default."""
        split = "val_accuracy" if self.config.data.val_size else "test_accuracy"
        return f"ema_{split}" if self.config.train.ema_decay else split

    def best_accuracy(self) -> float | None:
        """The best :attr:`selection` accuracy logged in metrics.jsonl so far (for a resumed run)."""
        accuracies = [row[self.selection] for row in self.epoch_rows() if self.selection in row]  # evaluated
        return max(accuracies) if accuracies else None

    def finish(self, summary: dict) -> None:
        """Write summary.json and the curves, release the directory, and report the summary."""
        if self.writes:
            write_json(self.path / "summary.json", summary)
            self._plot_curves(self.path / "plots" / "curves.png")
            if self._tensorboard is not None:
                self._tensorboard.hparams(config_to_dict(self.config), summary)
        self.close()
        self.reporter.end(summary)

    def close(self) -> None:
        """Release the directory's lock (the kernel also releases it if the process dies)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _open_tensorboard(self, step: int) -> None:
        """Open RUN_DIR/tb; a resumed run hides the events logged after its checkpoint, as metrics.jsonl drops them."""
        from fnclass.run.loggers import TensorBoardLogger

        try:
            self._tensorboard = TensorBoardLogger(self.path / "tb", purge_step=step + 1 if step else None)
        except InputError:
            self.close()
            raise

    def privacy_secret(self, *, resume: bool):
        """The secret key of a private run's noise and Poisson samples, in ``privacy.key`` (mode 0600): made from
        ``os.urandom`` for a new run, read back to resume one. Never in checkpoints, config.toml or exports, which
        record the seed: from the seed alone the noise could be regenerated and subtracted."""
        import torch

        from fnclass.privacy import new_secret

        path = self.path / "privacy.key"
        if resume:
            try:
                words = json.loads(path.read_text())["key"]
                return torch.tensor([int(words[0]), int(words[1])], dtype=torch.int64)
            except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
                reason = "is missing" if isinstance(error, FileNotFoundError) else "is not a key fnclass wrote"
                raise InputError(f"{path} {reason}: a private run's noise comes from that secret, so the run cannot "
                                 "be resumed without it; start a new run") from None
        self._new_secret = new_secret()  # written by start(), once the run directory is this process's
        return self._new_secret

    def _write_secret(self) -> None:
        """Write ``privacy.key`` readable by its owner only (created 0600, then renamed into place)."""
        path = self.path / "privacy.key"
        temp = path.with_name(path.name + ".tmp")
        temp.unlink(missing_ok=True)
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(json.dumps({"key": self._new_secret.tolist()}))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
        fsync_folder(self.path)

    def _acquire_lock(self) -> None:
        """Take the directory's lock, or raise :class:`RunLockedError` naming the process that holds it."""
        try:  # also the check, before any training, that the run directory is writable
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK_NAME, "a+", encoding="utf-8")
        except OSError as error:
            raise WriteError(f"cannot write the run directory {self.path}: {error.strerror or error}; choose a "
                             "writable --out") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunLockedError(f"{self.path} is in use by another fnclass process (pid {holder}): wait for it to "
                                 "finish or stop it, or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def _lines(self) -> list[tuple[str, dict]]:
        """The lines of metrics.jsonl with their rows; a line cut short by a crash (not a JSON object) is left out."""
        if not self.metrics_path.is_file():
            return []
        lines = []
        for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                lines.append((line, row))
        return lines

    def _rows(self) -> list[dict]:
        """The rows of metrics.jsonl."""
        return [row for _, row in self._lines()]

    def _truncate_metrics(self, step: int) -> None:
        """Keep only the metrics lines logged up to ``step`` (a resumed run replays the rest)."""
        if self.metrics_path.is_file():
            kept = [line for line, row in self._lines() if row["step"] <= step]
            write_atomic(self.metrics_path, "".join(line + "\n" for line in kept).encode())

    def _complete_epoch_end(self, step: int) -> None:
        """Make the copies an epoch end at ``step`` makes (best, kept), if a kill came between them and ``last``."""
        source = self.resumed_from or self.last
        epochs = self.epoch_rows()
        if not any(row["step"] == step for row in epochs) or not source.is_file():
            return  # not resumed from an epoch end
        evaluated = [row for row in epochs if self.selection in row]  # train.eval_every: not every epoch's row
        best = max(evaluated, key=lambda row: row[self.selection], default=None)  # the first of equals, as end_epoch
        if self.config.checkpoint.keep_best and best is not None and best["step"] == step:
            copy_checkpoint(source, self.checkpoints / "best.safetensors")
        kept = self.checkpoints / f"step-{step:08d}.safetensors"
        if self.config.checkpoint.keep and not kept.is_file():
            copy_checkpoint(source, kept)
        epoch = next(row["epoch"] for row in epochs if row["step"] == step)
        along = self.checkpoints / f"epoch-{epoch:04d}.safetensors"
        if self.keeps_epoch(epoch) and not along.is_file():
            copy_checkpoint(source, along)

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files left by a killed writer of this directory (this process now holds its lock)."""
        for folder in (self.path, self.checkpoints, self.path / "plots"):
            stale = list(folder.glob(".*.tmp")) if folder.is_dir() else []
            for temp in stale:
                temp.unlink(missing_ok=True)
            if stale:
                fsync_folder(folder)

    def _plot_curves(self, out_path: Path) -> None:
        """Draw loss and accuracy per epoch from metrics.jsonl into a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rows = self.epoch_rows()
        if not rows:
            return
        epochs = [r["epoch"] for r in rows]
        split = self.selection.removeprefix("ema_").split("_")[0]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        evaluated = [r for r in rows if f"{split}_accuracy" in r]  # train.eval_every: the evaluated epochs only
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
        ax_loss.plot([r["epoch"] for r in evaluated], [r[f"{split}_loss"] for r in evaluated], marker=".", label=split)
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        ax_acc.plot(epochs, [r["train_accuracy"] for r in rows], label="train")
        ax_acc.plot([r["epoch"] for r in evaluated], [r[f"{split}_accuracy"] for r in evaluated], marker=".",
                    label=split)
        ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        for ax in (ax_loss, ax_acc):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        save_figure(fig, out_path)
