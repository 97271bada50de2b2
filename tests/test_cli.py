"""`fnclass train`, `eval` and `info` end to end on real CIFAR-10 subsets, through click's CliRunner."""

import json
import shutil
import subprocess

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import fnclass
from fnclass.cli import main
from fnclass.config import load_config
from fnclass.data import channel_stats, load_split, validation_split, write_dataset
from fnclass.models import resolve_config
from fnclass.run.directory import Reporter
from fnclass.training.program import TrainingInterrupted, train

QUICK = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8", "data.train_limit=600",
         "data.test_limit=200", "train.epochs=2", "train.batch_size=100", "train.log_every_steps=2"]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def quick_run(cifar_dir, tmp_path_factory):
    """One short CLI training run shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("runs") / "quick"
    result = CliRunner().invoke(main, ["train", "--data-dir", str(cifar_dir), "--out", str(out), *_sets(QUICK)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_writes_the_run_directory(quick_run):
    out, output = quick_run
    for name in ("config.toml", "metrics.jsonl", "summary.json", "checkpoints/last.safetensors",
                 "checkpoints/best.safetensors", "plots/curves.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_accuracy", "best_test_accuracy", "train_seconds", "images_per_second", "device",
                "torch_version", "fnclass_version", "seed", "num_params"):
        assert key in summary
    assert 0.0 <= summary["test_accuracy"] <= summary["best_test_accuracy"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [2, 4, 6, 8, 10, 12]
    # config.toml is the resolved config: model.num_classes, left out, is the data folder's 10 classes, and
    # cpu.toml's train.precision = "auto" the precision it chose (fp32: the suite pins auto, tests/conftest.py)
    assert load_config(out / "config.toml") == resolve_config(load_config(
        "configs/cpu.toml", [*QUICK, "model.num_classes=10", "train.precision=fp32"]))
    assert "final test accuracy" in output and "accuracy airplane" in output  # plain lines off a terminal
    assert "╭" not in output
    assert (out / "plots/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grad_stats_during_training_are_logged(cifar_dir, tmp_path):
    config = load_config(None, QUICK + ["train.grad_stats_every=3", "train.grad_stats_examples=16"])
    train(config, tmp_path / "run", data_dir=str(cifar_dir))
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    stats = [r for r in rows if r["kind"] == "grad_stats"]
    assert [r["step"] for r in stats] == [3, 6, 9, 12]
    assert set(stats[0]["group_grad_norms"]) == {"stem", "blocks.0", "blocks.1", "blocks.2", "attn.0", "head"}
    assert all(r["grad_norm"] > 0 for r in stats)


def test_eval_and_info_read_the_checkpoint(quick_run, cifar_dir):
    out, _ = quick_run
    summary = json.loads((out / "summary.json").read_text())
    result = CliRunner().invoke(main, ["eval", str(out / "checkpoints/last.safetensors"), "--data-dir",
                                       str(cifar_dir), "--limit", "200", "--json", "--tta"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.output)
    assert evaluation["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert 0.0 <= evaluation["accuracy_tta"] <= 1.0
    installed = shutil.which("fnclass")
    assert installed, "the fnclass entry point is not installed"
    proc = subprocess.run([installed, "info", str(out / "checkpoints/last.safetensors"), "--json"],
                          capture_output=True, text=True, check=True)
    facts = json.loads(proc.stdout)
    assert facts["step"] == 12 and facts["model"] == "tiny" and facts["has_optimizer_state"]


class _StopAt(Reporter):
    def __init__(self, step):
        self.stop_step = step

    def step(self, info):
        if info["step"] == self.stop_step:
            raise KeyboardInterrupt


def test_interrupted_then_resumed_run_equals_uninterrupted(cifar_dir, tmp_path):
    config = load_config(None, QUICK)
    train(config, tmp_path / "straight", data_dir=str(cifar_dir))
    with pytest.raises(TrainingInterrupted) as stop:
        train(config, tmp_path / "broken", data_dir=str(cifar_dir), reporter=_StopAt(8))
    assert stop.value.step == 8  # mid-way through the second epoch
    summary = train(config, tmp_path / "broken", data_dir=str(cifar_dir), resume=True).summary
    assert summary["resumed_from_step"] == 8
    straight = safetensors.torch.load_file(tmp_path / "straight/checkpoints/last.safetensors")
    resumed = safetensors.torch.load_file(tmp_path / "broken/checkpoints/last.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert (straight[name] == resumed[name]).all(), name
    lines = (tmp_path / "broken/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [
        json.loads(line)["step"] for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_disagreeing_options(quick_run):
    out, _ = quick_run
    result = CliRunner().invoke(main, ["train", "--resume", str(out), *_sets(QUICK), "--set", "optim.lr=0.5"])
    assert result.exit_code == 2
    assert "optim.lr = 0.5 here but" in result.stderr and "in the run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_out_directory_with_a_run_is_not_overwritten(quick_run):
    out, _ = quick_run
    before = (out / "checkpoints/last.safetensors").read_bytes()
    result = CliRunner().invoke(main, ["train", "--out", str(out), *_sets(QUICK)])
    assert result.exit_code == 2 and "--resume" in result.output
    assert (out / "checkpoints/last.safetensors").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "optim.lr=-1"], "optim.lr = -1.0 is not allowed"),
    (["train", "--set", "model.nme=tiny"], "unknown key model.nme"),
    (["train", "--device", "tpu"], "Invalid value for '--device'"),
    (["train", "--bogus"], "No such option"),
    (["train", "--config", "missing.toml"], "no such config file"),
    (["train", "--data-dir", "/nonexistent/data", *_sets(QUICK)], "/nonexistent/data"),
    (["eval"], "give either a CHECKPOINT file or --model NAME"),
    (["info", "/nonexistent/ck.safetensors"], "no such checkpoint file"),
])
def test_bad_input_is_one_line_with_exit_code_2(args, message, tmp_path):
    result = CliRunner().invoke(main, args + (["--out", str(tmp_path / "run")] if args[0] == "train" else []))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_divergence_stops_with_a_one_line_error(cifar_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data-dir", str(cifar_dir), "--out", str(out), *_sets(QUICK),
                                       "--set", "optim.name=sgd", "--set", "optim.lr=1e6"])
    assert result.exit_code == 3 and "training diverged" in result.stderr and "optim.clip_norm" in result.stderr
    assert not (out / "checkpoints/last.safetensors").exists()


def test_truncated_checkpoint_is_one_line_and_left_alone(quick_run, tmp_path):
    out, _ = quick_run
    bad = tmp_path / "cut.safetensors"
    payload = (out / "checkpoints/last.safetensors").read_bytes()[:1000]
    bad.write_bytes(payload)
    for command in (["info", str(bad)], ["eval", str(bad)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2 and "truncated" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert bad.read_bytes() == payload


def test_grads_command_writes_its_report(quick_run, cifar_dir, tmp_path):
    out, _ = quick_run
    result = CliRunner().invoke(main, ["grads", str(out / "checkpoints/last.safetensors"), "--data-dir",
                                       str(cifar_dir), "--limit", "40", "--chunk-size", "16", "--top", "8",
                                       "--out", str(tmp_path / "g"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_examples"] == 40 and report["chunk_size"] == 16 and len(report["top_indices"]) == 8
    assert abs(sum(report["group_norm_share"].values()) - 1.0) < 1e-6
    assert "cross-entropy without label smoothing" in report["loss"]
    for name in ("per_example.csv", "report.json", "top_examples.png", "norms.png"):
        assert (tmp_path / "g" / name).is_file()
    table = CliRunner().invoke(main, ["grads", str(out / "checkpoints/last.safetensors"), "--data-dir",
                                      str(cifar_dir), "--limit", "20", "--max-memory", "50MB", "--out",
                                      str(tmp_path / "g2")])
    assert table.exit_code == 0 and "noise scale" in table.output and "layer groups" in table.output


@pytest.mark.parametrize("flag, value", [("--chunk-size", "lots"), ("--max-memory", "2 potatoes")])
def test_grads_bad_flags_are_one_line(quick_run, flag, value):
    out, _ = quick_run
    result = CliRunner().invoke(main, ["grads", str(out / "checkpoints/last.safetensors"), flag, value])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1 and flag in result.stderr


def test_a_validation_split_chooses_best_and_the_test_split_is_evaluated_once(cifar_dir, tmp_path):
    out = tmp_path / "val"
    result = CliRunner().invoke(main, ["train", "--data-dir", str(cifar_dir), "--out", str(out), "--json",
                                       *_sets([*QUICK, "train.epochs=3", "data.val_size=200", "data.val_seed=3",
                                               "train.eval_every=1"])])  # every epoch (cpu.toml: the last only)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in epochs if row["kind"] == "epoch"]
    assert all("val_accuracy" in row and "val_top5_accuracy" in row and "test_accuracy" not in row for row in epochs)
    assert (summary["train_images"], summary["val_images"], summary["test_images"]) == (400, 200, 200)
    best_row = max(epochs, key=lambda row: row["val_accuracy"])  # max keeps the first of equals, as the run does
    assert summary["best_val_accuracy"] == best_row["val_accuracy"] and "best_test_accuracy" not in summary
    assert summary["val_accuracy"] == epochs[-1]["val_accuracy"]
    best = fnclass.load_checkpoint(out / "checkpoints/best.safetensors")
    assert best.step == best_row["step"]

    def evaluate(name, *args):
        outcome = CliRunner().invoke(main, ["eval", str(out / "checkpoints" / name), "--data-dir", str(cifar_dir),
                                            "--json", *args])
        assert outcome.exit_code == 0, outcome.output
        return json.loads(outcome.output)

    # the test numbers are the final weights' on the test split; --split val rebuilds the held-out images
    last_test = evaluate("last.safetensors", "--limit", "200")
    assert last_test["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert last_test["top5_accuracy"] == pytest.approx(summary["test_top5_accuracy"], abs=1e-6)
    best_val = evaluate("best.safetensors", "--split", "val")
    assert best_val["images"] == 200 and best_val["accuracy"] == pytest.approx(best_row["val_accuracy"], abs=1e-6)
    # the normalisation comes from the 400 training images alone, not the held-out ones
    images, labels = load_split(cifar_dir, "train", limit=600)
    train_idx, val_idx = validation_split(labels, 200, 3)
    assert best.mean == pytest.approx(channel_stats(images[train_idx])[0], abs=1e-6)
    assert best.mean != pytest.approx(channel_stats(images)[0], abs=1e-6)


def test_num_classes_defaults_to_the_data_folders_classes(cifar_dir, tmp_path):
    images, labels = load_split(cifar_dir, "train", limit=2000)
    test_images, test_labels = load_split(cifar_dir, "test", limit=500)
    keep, keep_test = labels < 4, test_labels < 4
    write_dataset(tmp_path / "four", images[keep].numpy(), labels[keep].numpy(), test_images[keep_test].numpy(),
                  test_labels[keep_test].numpy(), ["airplane", "automobile", "bird", "cat"])
    sets = [item for item in QUICK if not item.startswith("data.")] + ["train.epochs=1"]
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data-dir", str(tmp_path / "four"), "--out", str(out),
                                       "--quiet", *_sets(sets)])
    assert result.exit_code == 0, result.output
    ckpt = fnclass.load_checkpoint(out / "checkpoints/last.safetensors")
    assert ckpt.config.model.num_classes == 4 and ckpt.params["head"]["weight"].shape[0] == 4
    assert load_config(out / "config.toml").model.num_classes == 4
    resumed = CliRunner().invoke(main, ["train", "--resume", str(out), "--data-dir", str(tmp_path / "four"),
                                        *_sets(sets), "--quiet"])
    assert resumed.exit_code == 0, resumed.output  # the left-out key agrees with the recorded 4
    wrong = CliRunner().invoke(main, ["train", "--data-dir", str(tmp_path / "four"), "--out", str(tmp_path / "x"),
                                      *_sets([*sets, "model.num_classes=10"])])
    assert wrong.exit_code == 2 and "model.num_classes = 10 but" in wrong.stderr and "has 4 classes" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


def test_ema_is_evaluated_saved_chosen_and_resumed(cifar_dir, tmp_path):
    config = load_config(None, [*QUICK, "train.ema_decay=0.8", "train.ema_warmup=true"])
    straight = train(config, tmp_path / "straight", data_dir=str(cifar_dir)).summary
    with pytest.raises(TrainingInterrupted):
        train(config, tmp_path / "broken", data_dir=str(cifar_dir), reporter=_StopAt(9))
    train(config, tmp_path / "broken", data_dir=str(cifar_dir), resume=True)
    a = safetensors.torch.load_file(tmp_path / "straight/checkpoints/last.safetensors")
    b = safetensors.torch.load_file(tmp_path / "broken/checkpoints/last.safetensors")
    assert any(name.startswith("ema.params.") for name in a) and a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)  # resume is exact: the average included
    rows = [json.loads(line) for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if row["kind"] == "epoch"]
    assert straight["selection"] == "ema_test_accuracy"
    assert straight["best_ema_test_accuracy"] == max(row["ema_test_accuracy"] for row in epochs)
    last = str(tmp_path / "straight/checkpoints/last.safetensors")

    def evaluate(*args):
        outcome = CliRunner().invoke(main, ["eval", *args, "--data-dir", str(cifar_dir), "--limit", "200", "--json"])
        assert outcome.exit_code == 0, outcome.output
        return json.loads(outcome.output)

    assert evaluate(last)["weights"] == "ema"  # the default when the checkpoint keeps an EMA
    assert evaluate(last)["accuracy"] == pytest.approx(straight["ema_test_accuracy"], abs=1e-6)
    assert evaluate(last, "--weights", "raw")["accuracy"] == pytest.approx(straight["test_accuracy"], abs=1e-6)
    ema = fnclass.load_checkpoint(last)
    raw = fnclass.load_checkpoint(last, weights="raw")
    assert torch.equal(ema.params["head"]["weight"], a["ema.params.head.weight"])
    assert torch.equal(raw.params["head"]["weight"], a["params.head.weight"])
    exported = tmp_path / "ema.safetensors"
    result = CliRunner().invoke(main, ["export", last, "--out", str(exported), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["metadata"]["weights"] == "ema"
    assert evaluate(str(exported))["accuracy"] == pytest.approx(straight["ema_test_accuracy"], abs=1e-6)
    refused = CliRunner().invoke(main, ["eval", str(exported), "--weights", "raw", "--data-dir", str(cifar_dir)])
    assert refused.exit_code == 2 and "--weights raw" in refused.stderr
    plain = train(load_config(None, QUICK), tmp_path / "plain", data_dir=str(cifar_dir)).summary
    no_ema = CliRunner().invoke(main, ["eval", str(tmp_path / "plain/checkpoints/last.safetensors"), "--weights",
                                       "ema", "--data-dir", str(cifar_dir)])
    assert no_ema.exit_code == 2 and "holds no EMA weights" in no_ema.stderr and "ema_test_accuracy" not in plain


def test_fp16_scaling_and_gradient_accumulation_train_and_resume_exactly(cifar_dir, tmp_path):
    """Both keep state in the TrainState (the loss scale; the accumulated gradient and mini-step count), so a run
    stopped between the two halves of an accumulation window resumes bit for bit; the logged learning rate is the
    schedule's in optimizer steps (one per two batches)."""
    config = load_config(None, [*QUICK, "train.precision=fp16", "train.accumulate_steps=2"])
    straight = train(config, tmp_path / "straight", data_dir=str(cifar_dir)).summary
    with pytest.raises(TrainingInterrupted):
        train(config, tmp_path / "broken", data_dir=str(cifar_dir), reporter=_StopAt(7))  # mid-window
    train(config, tmp_path / "broken", data_dir=str(cifar_dir), resume=True)
    a = safetensors.torch.load_file(tmp_path / "straight/checkpoints/last.safetensors")
    b = safetensors.torch.load_file(tmp_path / "broken/checkpoints/last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert float(a["loss_scale.scale"]) == 2.0 ** 16 and int(a["loss_scale.growth_tracker"]) == 12
    assert int(a["opt_state.count"]) == 12 and int(a["step"]) == 12  # 12 batches, 6 optimizer steps
    assert not a["opt_state.grad_sum.head.weight"].any()  # the window closed at the last batch
    from fnclass.training import recipe

    schedule = recipe.create_schedule(resolve_config(config).optim, 6 / 2, 2)  # 3 optimizer steps an epoch
    rows = [json.loads(line) for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row["kind"] == "step":
            assert row["lr"] == pytest.approx(float(schedule((row["step"] - 1) // 2)), rel=1e-6)
            assert row["skipped_steps"] == 0  # fp16 logs its skipped (overflow) steps, none here
    assert straight["steps"] == 12


def test_an_accumulation_window_longer_than_the_run_is_refused(cifar_dir, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"),
                                       *_sets([*QUICK, "train.accumulate_steps=13"])])  # 12 batches in all
    assert result.exit_code == 2 and "train.accumulate_steps = 13 is more than the run's 12 batches" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
