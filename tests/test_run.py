"""The run directory: which files a run writes, checkpoint retention, and writing nothing when told not to."""

import json

import optree
import torch

import fnclass
from fnclass.config import load_config
from fnclass.core import optim
from fnclass.models import resolve_config
from fnclass.run.directory import Reporter, RunDirectory

CONFIG = resolve_config(load_config(None, ["model.name=tiny", "model.widths=[8, 16, 16]", "checkpoint.keep=2"]))
META = dict(classes=[str(i) for i in range(10)], mean=(0.5,) * 3, std=(0.25,) * 3, input_size=(32, 32))


class Recorder(Reporter):
    def __init__(self):
        self.calls = []

    def start(self, info):
        self.calls.append("start")

    def epoch(self, row):
        self.calls.append(f"epoch {row['epoch']}")

    def end(self, summary):
        self.calls.append("end")


def _epochs(run, n):
    model = fnclass.build_model(CONFIG.model)
    ts = fnclass.create_train_state(model, optim.sgd(0.1), fnclass.key(0))
    run.start(step=0, info={}, **META)
    for epoch in range(n):
        ts = ts._replace(step=ts.step + 10)
        row = {"kind": "epoch", "step": int(ts.step), "epoch": epoch + 1, "train_loss": 1.0, "test_loss": 1.0,
               "train_accuracy": 0.5, "test_accuracy": [0.5, 0.7, 0.6, 0.65][epoch]}
        run.end_epoch(row, ts, best=epoch in (0, 1))
    run.finish({"done": True})
    return ts


def test_run_directory_writes_every_file_and_keeps_the_most_recent_checkpoints(tmp_path):
    reporter = Recorder()
    run = RunDirectory(tmp_path / "run", CONFIG, reporter=reporter)
    _epochs(run, 4)
    checkpoints = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert checkpoints == ["best.safetensors", "last.safetensors", "step-00000030.safetensors",
                           "step-00000040.safetensors"]  # checkpoint.keep = 2
    assert fnclass.load_checkpoint(tmp_path / "run/checkpoints/best.safetensors").step == 20  # epoch 2 was best
    assert run.best_accuracy() == 0.7
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run/summary.json").read_text()) == {"done": True}
    assert load_config(tmp_path / "run/config.toml") == CONFIG
    assert (tmp_path / "run/plots/curves.png").read_bytes()[:4] == b"\x89PNG"
    assert reporter.calls == ["start", "epoch 1", "epoch 2", "epoch 3", "epoch 4", "end"]


def test_resume_forgets_metrics_logged_after_the_checkpoint(tmp_path):
    run = RunDirectory(tmp_path / "run", CONFIG)
    _epochs(run, 3)
    RunDirectory(tmp_path / "run", CONFIG).start(step=20, info={}, **META)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20]


def test_a_run_directory_told_not_to_write_writes_nothing_but_still_reports(tmp_path):
    reporter = Recorder()
    _epochs(RunDirectory(tmp_path / "run", CONFIG, reporter=reporter, writes=False), 2)
    assert not (tmp_path / "run").exists()
    assert reporter.calls == ["start", "epoch 1", "epoch 2", "end"]


def test_a_second_writer_is_refused_until_the_first_process_dies(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import pytest

    from fnclass.run.directory import RunLockedError

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom fnclass.config import load_config\nfrom fnclass.models import "
         "resolve_config\nfrom fnclass.run.directory import RunDirectory\nconfig = resolve_config(load_config(None, "
         "['model.name=tiny']))\nrun = RunDirectory(sys.argv[1], config)\nrun.start(step=0, info={}, classes=[], "
         "mean=(0,) * 3, std=(1,) * 3, input_size=(32, 32))\nprint('locked', flush=True)\nsys.stdin.read()\n",
         str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by another fnclass process \\(pid {holder.pid}\\)"):
            RunDirectory(tmp_path / "run", CONFIG).start(step=0, info={}, **META)
        assert not (tmp_path / "run/metrics.jsonl").exists() and (tmp_path / "run/config.toml").is_file()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a hard kill: the kernel drops the lock, nothing else does
        holder.wait()
    run = RunDirectory(tmp_path / "run", CONFIG)
    run.start(step=0, info={}, **META)  # the dead process's lock no longer blocks
    run.close()
    second = RunDirectory(tmp_path / "run", CONFIG)
    second.start(step=0, info={}, **META)  # closed: free again in the same process
    second.close()


def test_eval_every_leaves_training_unchanged_and_chooses_best_among_the_evaluated_epochs(cifar_dir, tmp_path):
    """``train.eval_every``: the same weights as evaluating every epoch (evaluation does not touch training), rows
    of epochs not evaluated carry no test columns (not a stale or made-up value), and ``best`` is the best of the
    evaluated epochs only; the last epoch is always evaluated, with the numbers an every-epoch run logs."""
    from fnclass.run.checkpoint import load_checkpoint
    from fnclass.training.program import train

    quick = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.whiten=false", "optim.muon=false",
             "optim.whiten_bias_epochs=0", "data.train_limit=256", "data.test_limit=200", "train.batch_size=64",
             "train.epochs=3", "train.log_every_steps=0", "train.tta=false", "checkpoint.keep=0"]
    runs = {}
    for every in (1, 2, 0):
        out = tmp_path / f"every{every}"
        train(load_config("cpu", quick + [f"train.eval_every={every}"]), out, data_dir=str(cifar_dir))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[every] = (out, [row for row in rows if row["kind"] == "epoch"])
    every_epoch = runs[1][1]
    for every, evaluated in ((2, [2, 3]), (0, [3])):
        out, rows = runs[every]
        assert [row["epoch"] for row in rows if "test_accuracy" in row] == evaluated
        assert not any("test_loss" in row for row in rows if row["epoch"] not in evaluated)
        for row, reference in zip(rows, every_epoch):
            assert row["train_loss"] == reference["train_loss"]  # bit for bit: evaluation changes nothing
            if row["epoch"] in evaluated:
                assert row["test_accuracy"] == reference["test_accuracy"]
        best = max((row for row in rows if "test_accuracy" in row), key=lambda row: row["test_accuracy"])
        assert load_checkpoint(out / "checkpoints/best.safetensors").step == best["step"]
        last, reference = (load_checkpoint(path / "checkpoints/last.safetensors") for path in (out, runs[1][0]))
        assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(last.params),
                                                     optree.tree_leaves(reference.params)))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["best_test_accuracy"] == best["test_accuracy"]
    assert (runs[0][0] / "plots/curves.png").is_file()
