"""A newcomer's first hour (issue 32): what the commands print, what they take, and what they leave behind."""

from __future__ import annotations

import io
import json
import re
import shlex

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

import fnclass
from fnclass.cli import main
from fnclass.cli import progress as progress_module
from fnclass.config import load_config, shipped_configs

TINY = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8"]
QUICK = [*TINY, "data.train_limit=300", "data.test_limit=100", "train.epochs=2", "train.batch_size=50",
         "train.tta=false", "train.log_every_steps=4", "checkpoint.every_epochs=1", "train.eval_batch_size=25"]


def _sets(values):
    return [a for s in values for a in ("--set", s)]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("newcomer") / "run"
    result = _invoke("train", "--data-dir", cifar_dir, "--out", out, *_sets(QUICK))
    assert result.exit_code == 0, result.output
    return out


def test_piped_long_commands_print_progress_lines_with_a_total(cifar_dir, run, tmp_path, monkeypatch):
    """Off a terminal, grads, influence and eval print `WHAT: DONE/TOTAL (P%), ...` lines on stderr (every
    PLAIN_EVERY_SECONDS: 0 here, so every update), the last one `done`; their results stay alone on stdout."""
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_SECONDS", 0.0)
    commands = {
        "el2n scores": ["grads", run, "--score", "el2n", "--chunk-size", "50", "--out", tmp_path / "s"],
        "per-example gradients": ["grads", run, "--limit", "40", "--chunk-size", "20", "--out", tmp_path / "g"],
        "tracin: per-example gradients": ["influence", run, "--test-indices", "0-1", "--train-limit", "40",
                                          "--chunk-size", "20", "--out", tmp_path / "i"],
        "evaluating test images": ["eval", run, "--tta", "--limit", "100"],
    }
    totals = {"el2n scores": 300, "per-example gradients": 80, "tracin: per-example gradients": 80,
              "evaluating test images": 100}  # grads' two passes; influence at the 2 epochs' checkpoints
    for what, args in commands.items():
        result = _invoke(*args[:1], "--data-dir", cifar_dir, *args[1:])
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stderr.splitlines() if line.startswith(f"{what}: ")]
        assert len(lines) >= 2, result.stderr
        counts = [re.match(rf"{re.escape(what)}: ([\d,]+)/([\d,]+) \((\d+)%\), \d+ s, ", line) for line in lines]
        assert all(counts), lines
        done = [int(m.group(1).replace(",", "")) for m in counts]
        assert {int(m.group(2).replace(",", "")) for m in counts} == {totals[what]}
        assert done == sorted(done) and done[-1] == totals[what] and lines[-1].endswith("done")
        assert what not in result.stdout
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_SECONDS", 3600.0)  # a short command prints no line
    quiet = _invoke("grads", run, "--data-dir", cifar_dir, "--score", "el2n", "--out", tmp_path / "q")
    assert quiet.exit_code == 0 and "el2n scores:" not in quiet.stderr


def test_the_plain_line_says_the_time_left_from_the_rate_so_far():
    assert progress_module.plain_line("x", 300, 1200, 30.0) == "x: 300/1,200 (25%), 30 s, about 90 s left"
    assert progress_module.plain_line("x", 1200, 1200, 41.0) == "x: 1,200/1,200 (100%), 41 s, done"
    assert progress_module.plain_line("x", 7, None, 2.0) == "x: 7, 2 s"


def test_the_train_bar_shows_a_loss_only_once_one_is_logged():
    from rich.progress import Progress

    from fnclass.cli.train import RichReporter

    reporter = RichReporter(Console(file=io.StringIO()), mode="normal")
    reporter.progress = Progress(console=Console(file=io.StringIO()))
    info = {"epoch": 0, "epoch_step": 1, "steps_per_epoch": 20, "images_per_second": 100.0, "lr": 0.1}
    reporter.step(info)
    assert reporter.progress.tasks[0].fields["loss"] == "-"
    reporter.step({**info, "epoch_step": 20, "loss": 2.30258})
    assert reporter.progress.tasks[0].fields["loss"] == "2.303"
    reporter.step({**info, "epoch_step": 1, "epoch": 1})  # the next epoch keeps the last value until a new one
    assert reporter.progress.tasks[-1].fields["loss"] == "2.303"


def test_fnclass_train_prints_plain_progress_by_default_and_a_reporter_silences_it(cifar_dir, tmp_path, capsys):
    from fnclass.run.directory import Reporter

    config = load_config(None, [*QUICK, "train.epochs=1"])
    result = fnclass.train(config, tmp_path / "loud", data_dir=str(cifar_dir))
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("fnclass: training tiny on cpu (fp32), 300 training images, 6 steps/epoch x 1 epochs")
    assert err[-2].startswith("epoch 1: train loss ") and f"test accuracy {result.summary['test_accuracy']:.2%}" in \
        err[-2]
    assert err[-1].startswith(f"done: test accuracy {result.summary['test_accuracy']:.2%}")
    small = load_config(None, [*QUICK, "train.epochs=1", "data.train_limit=100"])
    fnclass.train(small, tmp_path / "silent", data_dir=str(cifar_dir), reporter=Reporter())
    assert capsys.readouterr().err == ""


def test_the_config_names_in_help_and_completion_are_the_shipped_ones():
    names = list(shipped_configs())
    assert "dp" in names
    listed = ", ".join(names)
    assert f"shipped: {listed}" in _invoke("config", "--help").output
    assert f"({listed})" in " ".join(_invoke("train", "--help").output.split())
    assert f"shipped: {listed}" in _invoke("--help").output
    from fnclass.cli.options import complete_config

    completions = complete_config(None, None, "fa")
    assert [c.value for c in completions if c.type == "plain"] == [n for n in names if n.startswith("fa")]
    assert any(c.type == "file" for c in completions)  # and TOML files, by the shell


def test_the_python_api_takes_numpy_images_and_names_a_wrong_layout(cifar_dir):
    from fnclass.errors import InputError

    model = fnclass.pretrained("cifar10-cpu")
    images = np.load(cifar_dir / "test_images.npy", mmap_mode="r")[:4]
    assert torch.equal(model.logits(images), model.logits(torch.from_numpy(np.array(images))))
    assert torch.equal(model.logits(np.array(images[0])), model.logits(torch.from_numpy(np.array(images[:1]))))
    with pytest.raises(InputError, match=r"expected uint8 RGB \(N, H, W, 3\), got float32 .*astype\(np.uint8\)"):
        model.logits(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(InputError, match=r"got shape \(2, 3, 32, 32\), channels last: x.transpose\(0, 2, 3, 1\)"):
        model.logits(np.zeros((2, 3, 32, 32), np.uint8))


def test_the_summary_and_a_sweep_read_cleanly(cifar_dir, tmp_path):
    result = _invoke("train", "--data-dir", cifar_dir, "--out", tmp_path / "ema", *_sets(
        [*QUICK, "data.val_size=50", "train.ema_decay=0.999", "train.epochs=1"]))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ema/summary.json").read_text())
    assert f"best ema val accuracy {summary['best_ema_val_accuracy']:.2%}" in result.output
    # EMA warm-up is on by default: a one-epoch EMA at 0.999 follows the weights (not the random start)
    assert load_config(tmp_path / "ema/config.toml").train.ema_warmup
    assert abs(summary["ema_test_accuracy"] - summary["test_accuracy"]) < 0.15, summary
    sweep = _invoke("train", "--data-dir", cifar_dir, "--out", tmp_path / "sweep", "--sweep", "optim.lr=0.05,0.1",
                    *_sets([*QUICK, "train.epochs=1", "optim.lr=0.2"]))
    assert sweep.exit_code == 0, sweep.output
    assert "(1 seeds)" not in sweep.output
    assert re.search(r"lr = 0\.05: \d+\.\d\d% \(1 seed\)\n", sweep.output), sweep.output  # one run: its value alone
    assert re.search(r"optim.lr = 0\.1 +\d+\.\d\d% \(1 seed\)\n", sweep.output), sweep.output
    assert "lr scale" in sweep.output  # the column: the schedule's multiple of each member's swept lr
    rows = [json.loads(line) for line in (tmp_path / "sweep/metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "epoch"][-1]
    table = [line for line in sweep.output.splitlines() if line.strip().startswith("1  ")][-1]
    assert f"{last['lr'] / 0.2:.4f}" in table.split()


def test_resuming_a_finished_run_shows_its_summary_and_changes_nothing(run, tmp_path):
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    result = _invoke("train", "--resume", run)
    assert result.exit_code == 0, result.output
    assert f"--resume {run}: the run already finished its 2 epochs (step 12); nothing to train" in \
        " ".join(result.output.split())
    summary = json.loads((run / "summary.json").read_text())
    assert f"final test accuracy  {summary['test_accuracy']:.2%}" in result.output
    assert "training time        0.0 s" not in result.output
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    missing = _invoke("train", "--resume", tmp_path / "nowhere")
    assert missing.exit_code == 2
    assert missing.stderr.strip().splitlines() == [f"error: --resume {tmp_path / 'nowhere'}: no such folder; give the "
                                                   "folder a run was started in (its --out)"]


def test_a_run_folder_stands_for_its_best_checkpoint(cifar_dir, run, tmp_path):
    best = run / "checkpoints/best.safetensors"
    by_folder = _invoke("eval", run, "--data-dir", cifar_dir, "--limit", "100", "--json")
    by_file = _invoke("eval", best, "--data-dir", cifar_dir, "--limit", "100", "--json")
    assert json.loads(by_folder.stdout)["checkpoint"] == str(best)
    assert json.loads(by_folder.stdout)["accuracy"] == json.loads(by_file.stdout)["accuracy"]
    said = _invoke("eval", run, "--data-dir", cifar_dir, "--limit", "100")
    assert f"{run}: using {best} (the run's best checkpoint; give a file to choose another)" in said.stderr
    exported = _invoke("export", run, "--out", tmp_path / "m.safetensors")
    assert exported.exit_code == 0 and (tmp_path / "m.safetensors").is_file(), exported.output
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.array(np.load(cifar_dir / "test_images.npy", mmap_mode="r")[0])).save(image)
    predicted = {str(source): json.loads(_invoke("predict", source, image, "--json").stdout)["predictions"]
                 for source in (run, best)}
    assert predicted[str(run)] == predicted[str(best)]
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = _invoke("grads", empty, "--data-dir", cifar_dir)
    assert refused.exit_code == 2 and "without checkpoints/best.safetensors or last.safetensors" in refused.stderr


def test_grads_takes_the_rows_the_run_trained_on_as_influence_does(cifar_dir, tmp_path):
    """A run on data.train_indices (rows 1000-1199, less a 40-image validation split): grads --score scores those
    rows, names them in scores.csv and kept_indices.txt, and --rows split scores every row of the split."""
    from fnclass.analysis.influence import training_rows
    from fnclass.run.checkpoint import load_checkpoint

    selection = tmp_path / "rows.txt"
    selection.write_text("".join(f"{i}\n" for i in range(1000, 1200)))
    out = tmp_path / "run"
    result = _invoke("train", "--data-dir", cifar_dir, "--out", out, *_sets(
        [*TINY, f"data.train_indices={shlex.quote(str(selection))}", "data.val_size=40", "data.test_limit=100",
         "train.epochs=1", "train.batch_size=40", "train.tta=false"]))
    assert result.exit_code == 0, result.output
    labels = torch.from_numpy(np.load(cifar_dir / "train_labels.npy"))
    rows = training_rows(load_checkpoint(out / "checkpoints/last.safetensors"), labels)
    assert len(rows) == 160 and set(rows.tolist()) < set(range(1000, 1200))
    scored = _invoke("grads", out, "--data-dir", cifar_dir, "--score", "el2n", "--keep-fraction", "0.5", "--out",
                     tmp_path / "s", "--json")
    summary = json.loads(scored.stdout)
    assert (summary["rows"], summary["num_examples"], summary["kept"]) == ("run", 160, 80)
    csv_rows = [line.split(",") for line in (tmp_path / "s/scores.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in csv_rows] == rows.tolist()
    assert [int(r[1]) for r in csv_rows] == labels[rows].tolist()
    kept = [int(v) for v in (tmp_path / "s/kept_indices.txt").read_text().split()]
    top = sorted(csv_rows, key=lambda r: -float(r[2]))[:80]
    assert kept == sorted(int(r[0]) for r in top)
    every = json.loads(_invoke("grads", out, "--data-dir", cifar_dir, "--score", "el2n", "--rows", "split",
                               "--limit", "300", "--out", tmp_path / "all", "--json").stdout)
    assert (every["rows"], every["num_examples"]) == ("split", 300)


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    from fnclass import data

    monkeypatch.delenv("FNCLASS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(name, root, *, train, download):  # what torchvision does offline: make its folder, then fail
        (root / "cifar-10-batches-py.tar.gz.part").parent.mkdir(parents=True, exist_ok=True)
        (root / "cifar-10-batches-py.tar.gz.part").write_bytes(b"partial")
        raise data._Unavailable(f"{name} is not in {root} and downloading it failed (offline)")

    monkeypatch.setattr(data, "_torchvision_split", offline)
    with pytest.raises(data.DataError, match="downloading it failed"):
        data.resolve_data_dir(None, "cifar10")
    assert not (tmp_path / "cache").exists()
    (tmp_path / "mine").mkdir()  # a folder that was there before stays, with what it held
    (tmp_path / "mine/keep.txt").write_text("x")
    with pytest.raises(data.DataError):
        data.prepare_torchvision("cifar10", tmp_path / "mine/out", download_root=tmp_path / "mine/tv")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["keep.txt"]
