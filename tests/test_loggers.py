"""TensorBoard logging: the rows written are the scalars TensorBoard's own reader finds, tag by tag and step by step."""

import math
import subprocess
import sys
import time

import pytest

from fnclass.config import Config, config_to_dict
from fnclass.errors import InputError
from fnclass.run.loggers import MISSING_TENSORBOARD, TensorBoardLogger, flatten_config
from tests.needs import missing

# TensorBoard stores a scalar as a float32: rounding to nearest costs at most half an ulp, a relative 2**-24.
FLOAT32_REL = 2.0**-24

ROWS = [
    {"kind": "step", "step": 10, "epoch": 0, "loss": 2.25, "lr": 0.1, "skipped_steps": 1},
    {"kind": "step", "step": 20, "epoch": 0, "loss": None, "lr": 0.2},  # a non-finite loss is logged as null
    {"kind": "step", "member": 1, "step": 10, "epoch": 0, "loss": 2.5, "lr": 0.05},
    {"kind": "grad_stats", "step": 20, "epoch": 0, "noise_scale": 123.4, "grad_norm": 0.7,
     "group_grad_norms": {"stem": 0.3, "head": 0.2}},
    {"kind": "epoch", "step": 20, "epoch": 1, "train_loss": float("nan"), "train_accuracy": 0.31, "test_loss": 1.7,
     "test_accuracy": 0.4, "lr": 0.2, "seconds": 3.5, "skipped_steps": 0, "images_per_second": 12345.678,
     "val_accuracy": 0.41, "members": 2, "groups": [{"members": 2, "mean": 0.4}], "tta": True, "note": "text"},
    {"kind": "member_epoch", "member": 0, "step": 20, "epoch": 1, "seed": 7, "optim.lr": 0.1, "test_accuracy": 0.38},
    {"kind": "probe", "step": 5, "epoch": 0, "margin": 0.25, "detail": {"a": 1}},
]
# Written out by hand from ROWS, not computed by the code under test.
EXPECTED = {
    "train/loss": [(10, 2.25)], "train/lr": [(10, 0.1), (20, 0.2)], "train/skipped_steps": [(10, 1)],
    "member1/train/loss": [(10, 2.5)], "member1/train/lr": [(10, 0.05)],
    "grad_stats/noise_scale": [(20, 123.4)], "grad_stats/grad_norm": [(20, 0.7)],
    "grad_stats/group/stem": [(20, 0.3)], "grad_stats/group/head": [(20, 0.2)],
    "epoch/train_loss": [(20, math.nan)], "epoch/train_accuracy": [(20, 0.31)], "epoch/test_loss": [(20, 1.7)],
    "epoch/test_accuracy": [(20, 0.4)], "epoch/lr": [(20, 0.2)], "epoch/seconds": [(20, 3.5)],
    "epoch/skipped_steps": [(20, 0)], "epoch/images_per_second": [(20, 12345.678)],
    "epoch/val_accuracy": [(20, 0.41)], "epoch/members": [(20, 2)],
    "member0/seed": [(20, 7)], "member0/optim.lr": [(20, 0.1)], "member0/test_accuracy": [(20, 0.38)],
    "probe/margin": [(5, 0.25)],
}


def require_tensorboard():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        missing("the tensorboard extra is not installed: pip install -e '.[tensorboard]'")


def read_back(folder):
    """Every scalar in ``folder`` as TensorBoard reads it, by tag, and the accumulator, for the rest.

    TensorBoard has two readers, which take a resumed run's purge step differently: ``event_accumulator`` purges
    at every session start, ``plugin_event_accumulator`` (its server's, without --load_fast) not at a folder's
    first. Both are read, and must agree.
    """
    require_tensorboard()
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
    from tensorboard.util import tensor_util

    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
               for tag in accumulator.Tags()["scalars"]}
    server = plugin_event_accumulator.EventAccumulator(str(folder), size_guidance={"tensors": 0})
    server.Reload()
    served = {tag: [(event.step, float(tensor_util.make_ndarray(event.tensor_proto))) for event in server.Tensors(tag)]
              for tag in server.PluginTagToContent("scalars")}
    scalars, served = ({tag: points for tag, points in read.items() if points} for read in (scalars, served))
    same(served, scalars)  # a purged tag stays listed, empty: left out of both
    return scalars, accumulator


def same(read, expected):
    """Equal tags and steps, values equal to float32 precision (nan where nan was written)."""
    assert read.keys() == expected.keys()
    for tag, points in expected.items():
        assert [step for step, _ in read[tag]] == [step for step, _ in points], tag
        for (_, value), (_, want) in zip(read[tag], points):
            assert math.isnan(value) if math.isnan(want) else math.isclose(value, want, rel_tol=FLOAT32_REL), tag


def test_every_numeric_field_of_every_row_is_read_back_at_its_step(tmp_path):
    require_tensorboard()
    logger = TensorBoardLogger(tmp_path / "tb")
    for row in ROWS:
        logger.row(row)
    logger.close()
    same(read_back(tmp_path / "tb")[0], EXPECTED)


def test_a_row_is_on_disk_when_row_returns_even_on_a_slow_disk(tmp_path, monkeypatch):
    require_tensorboard()
    from tensorboard.summary.writer.record_writer import RecordWriter

    logger = TensorBoardLogger(tmp_path / "tb")
    # The events are written by a thread of the writer's own: a slow disk leaves them queued unless row() waits.
    write = RecordWriter.write

    def slow_write(self, data):
        time.sleep(0.1)
        write(self, data)

    monkeypatch.setattr(RecordWriter, "write", slow_write)
    logger.row(ROWS[0])
    try:  # a killed run never closes its logger
        same(read_back(tmp_path / "tb")[0], {"train/loss": [(10, 2.25)], "train/lr": [(10, 0.1)],
                                             "train/skipped_steps": [(10, 1)]})
    finally:
        logger.close()


def test_a_resumed_run_replaces_the_events_from_its_purge_step_on(tmp_path):
    require_tensorboard()
    first = TensorBoardLogger(tmp_path / "tb")
    for step in range(1, 11):
        first.row({"kind": "step", "step": step, "epoch": 0, "loss": float(step)})
    first.close()
    # TensorBoard reads a folder's event files in name order, and a name begins with the second it was created in:
    # a resumed run (another process, started later) sorts after the run it resumes. Within one second the order
    # would rest on a per-process counter, so this test waits for the next second.
    time.sleep(1.01 - time.time() % 1)
    resumed = TensorBoardLogger(tmp_path / "tb", purge_step=6)
    for step in range(6, 9):
        resumed.row({"kind": "step", "step": step, "epoch": 0, "loss": 100.0 + step})
    resumed.close()
    same(read_back(tmp_path / "tb")[0], {"train/loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0),
                                                        (6, 106.0), (7, 107.0), (8, 108.0)]})


def test_a_new_run_deletes_the_events_of_an_earlier_run_in_its_folder(tmp_path):
    require_tensorboard()
    earlier = TensorBoardLogger(tmp_path / "tb")
    earlier.row(ROWS[0])
    earlier.hparams({"optim": {"lr": 0.1}}, {"test_accuracy": 0.5})
    earlier.close()
    (tmp_path / "tb" / "notes.txt").write_text("kept")
    new = TensorBoardLogger(tmp_path / "tb")
    new.row({"kind": "step", "step": 20, "epoch": 0, "loss": 1.5})
    new.close()
    scalars, accumulator = read_back(tmp_path / "tb")
    same(scalars, {"train/loss": [(20, 1.5)]})
    with pytest.raises(KeyError, match="hparams"):  # no hparams at all: the earlier run's are gone
        accumulator.PluginTagToContent("hparams")
    assert (tmp_path / "tb" / "notes.txt").read_text() == "kept"


def test_hparams_hold_the_flattened_config_and_the_numeric_final_metrics_in_the_same_run(tmp_path):
    require_tensorboard()
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    config = config_to_dict(Config())
    config["model"]["widths"] = [48, 96, 192]
    config["model"]["depths"] = (1, 2)
    config["train"]["absent"] = None
    metrics = {"test_accuracy": 0.93, "best_test_accuracy": 0.94, "steps": 970, "model": "resnet_attn",
               "resumed_from_step": None, "per_class_accuracy": {"cat": 0.8}, "seed": [0, 1], "finished": True}
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.row(ROWS[0])
    logger.hparams(config, metrics)
    logger.close()

    assert [path.name for path in (tmp_path / "tb").iterdir() if path.is_dir()] == []
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    assert list(multiplexer.Runs()) == ["tb"]  # one run, not the run and a time-stamped hparams run beside it
    scalars, accumulator = read_back(tmp_path / "tb")
    final = {"hparams/test_accuracy": [(0, 0.93)], "hparams/best_test_accuracy": [(0, 0.94)],
             "hparams/steps": [(0, 970)]}
    same({tag: points for tag, points in scalars.items() if tag.startswith("hparams/")}, final)

    content = accumulator.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert {info.name.tag for info in experiment.metric_infos} == final.keys()
    written = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG]).hparams
    flat = {key: value for key, value in flatten_config(config).items() if value is not None}
    assert written.keys() == flat.keys() and "model.widths" in flat and "train.absent" not in written
    for key, value in flat.items():
        if isinstance(value, (list, tuple)):
            assert written[key].string_value == str(list(value)), key  # "[48, 96, 192]"
        elif isinstance(value, str):
            assert written[key].string_value == value, key
        else:  # torch writes a bool as the number 1.0 or 0.0; numbers are float64 there, so exact
            assert written[key].number_value == float(value), key


def test_a_missing_tensorboard_package_is_an_input_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets when it is not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(InputError) as caught:
        TensorBoardLogger(tmp_path / "tb")
    assert str(caught.value) == MISSING_TENSORBOARD
    assert "\n" not in str(caught.value) and "pip install 'fnclass[tensorboard]'" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not (tmp_path / "tb").exists()


def test_importing_the_module_loads_neither_torch_nor_tensorboard():
    code = "import sys, fnclass.run.loggers; print(sorted(m for m in ('torch', 'tensorboard') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_flatten_config_joins_nested_keys_with_dots_and_keeps_values():
    nested = {"optim": {"lr": 0.2, "schedule": {"warmup": 3}}, "model": {"widths": [48, 96]}, "name": "run",
              "empty": {}}
    assert flatten_config(nested) == {"optim.lr": 0.2, "optim.schedule.warmup": 3, "model.widths": [48, 96],
                                      "name": "run"}
    assert flatten_config({"a.b": 1}) == {"a.b": 1}
