"""``data.train_weights``: a loss weight per training row with every batch, key and augmentation unchanged. All-ones
weights are the unweighted run bit for bit; weight 0 is the run whose loss masks those examples by hand; members
and validation splits carry the weights; bad files and combinations are one line before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from fnclass import data
from fnclass.config import load_config
from fnclass.training import recipe
from fnclass.training.program import train
from tests.oneline import one_error_line

N = 256
SMALL = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8", "model.whiten=false",
         "model.dirac_init=false", "optim.whiten_bias_epochs=0", "optim.muon=false", "data.test_limit=200",
         "train.epochs=2", "train.batch_size=64", "train.log_every_steps=0", "train.channels_last=false",
         "train.tta=false", f"data.train_limit={N}"]
REMOVED = [3, 17, 40, 41, 100, 200, 255]  # rows of train_images.npy whose loss weight is 0


def _last(run) -> dict:
    return safetensors.torch.load_file(run / "checkpoints/last.safetensors")


def _weights_file(folder, values, name="weights.npy"):
    path = folder / name
    np.save(path, np.asarray(values, dtype=np.float32), allow_pickle=False)
    return path


def _total(cifar_dir) -> int:
    return len(np.load(cifar_dir / "train_labels.npy", mmap_mode="r"))


def test_all_ones_is_the_unweighted_run_bit_for_bit(cifar_dir, tmp_path):
    ones = _weights_file(tmp_path, np.ones(_total(cifar_dir)))
    weighted = train(load_config("cpu", SMALL + [f"data.train_weights={ones}"]), tmp_path / "w",
                     data_dir=str(cifar_dir))
    plain = train(load_config("cpu", SMALL), tmp_path / "p", data_dir=str(cifar_dir))
    a, b = _last(tmp_path / "w"), _last(tmp_path / "p")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda run: [(r["train_loss"], r["train_accuracy"]) for r in map(json.loads, (run / "metrics.jsonl")
                                                                          .read_text().splitlines())]
    assert rows(tmp_path / "w") == rows(tmp_path / "p")
    assert weighted.summary["test_accuracy"] == plain.summary["test_accuracy"]


def test_weight_zero_is_the_loss_masked_by_hand(cifar_dir, tmp_path, monkeypatch):
    """Reference: the same run without weights, the removed rows relabelled -1 as they are loaded and the loss
    ``sum of the other rows' cross-entropy / batch size`` written here. Same batches and keys, and each example's
    gradient is its own times exactly 1/B or 0 both ways, so the parameters agree bit for bit; both are far from the
    unweighted run."""
    weights = np.ones(_total(cifar_dir))
    weights[REMOVED] = 0.0
    path = _weights_file(tmp_path, weights)
    config = load_config("cpu", SMALL + ["train.label_smoothing=0"])
    train(load_config("cpu", SMALL + ["train.label_smoothing=0", f"data.train_weights={path}"]), tmp_path / "w",
          data_dir=str(cifar_dir))
    train(config, tmp_path / "plain", data_dir=str(cifar_dir))

    load_dataset = data.load_dataset

    def relabelled(*args, **kwargs):
        dataset = load_dataset(*args, **kwargs)
        labels = dataset.train_labels.clone()
        labels[REMOVED] = -1
        return dataset._replace(train_labels=labels)

    masked = lambda logits, labels: F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum") / len(
        labels)
    monkeypatch.setattr(data, "load_dataset", relabelled)
    monkeypatch.setattr(recipe, "create_loss", lambda config, hyper=None: masked)
    train(config, tmp_path / "hand", data_dir=str(cifar_dir))

    weighted, hand, plain = _last(tmp_path / "w"), _last(tmp_path / "hand"), _last(tmp_path / "plain")
    for name in weighted:  # every example's gradient is scaled by exactly 1/B (or 0) both ways: the same bits
        if "params" in name:
            assert torch.equal(weighted[name], hand[name]), name
    moved = max(float((weighted[k] - plain[k]).abs().max()) for k in weighted if "params" in k)
    assert moved > 1e-3  # the removed examples mattered: the comparison above can fail


def test_members_and_a_validation_split_carry_the_weights(cifar_dir, tmp_path):
    """K = 2 members (loop strategy) equal their single runs with the same weights, bit for bit, with a validation
    split carved from the weighted rows (their weights follow them out)."""
    weights = np.random.default_rng(0).uniform(0, 2, _total(cifar_dir))
    path = _weights_file(tmp_path, weights)
    common = SMALL + [f"data.train_weights={path}", "data.val_size=32"]
    train(load_config("cpu", common + ["members.seeds=[0, 1]", "members.strategy=loop"]), tmp_path / "m",
          data_dir=str(cifar_dir))
    train(load_config("cpu", common + ["train.seed=1"]), tmp_path / "one", data_dir=str(cifar_dir))
    train(load_config("cpu", SMALL + ["data.val_size=32", "train.seed=1"]), tmp_path / "plain",
          data_dir=str(cifar_dir))
    stacked, single, plain = _last(tmp_path / "m"), _last(tmp_path / "one"), _last(tmp_path / "plain")
    params = [k for k in single if "params" in k]
    assert all(torch.equal(stacked[k][1], single[k]) for k in params)
    assert any(not torch.equal(single[k], plain[k]) for k in params)


def test_a_text_file_reads_as_the_npy(tmp_path):
    values = [1.0, 0.0, 2.5, 1e-3]
    (tmp_path / "w.txt").write_text("1\n0\n\n2.5\n1e-3\n")
    _weights_file(tmp_path, values)
    assert torch.equal(data.read_weights(tmp_path / "w.txt", 4), data.read_weights(tmp_path / "weights.npy", 4))
    assert data.read_weights(tmp_path / "w.txt", 4).tolist() == pytest.approx(values)


@pytest.mark.parametrize("content, expected", [
    ("lines", "holds 3 weights but train_images.npy has"),
    ("negative", "the weight of row 1 is -1.0"),
    ("nan", "the weight of row 0 is nan"),
    ("word", "line 2 is 'x', not a number"),
])
def test_bad_weight_files_are_one_line(cifar_dir, tmp_path, content, expected):
    total = _total(cifar_dir)
    if content == "lines":
        path = _weights_file(tmp_path, [1.0, 1.0, 1.0])
    elif content == "negative":
        path = _weights_file(tmp_path, [1.0, -1.0] + [1.0] * (total - 2))
    elif content == "nan":
        path = _weights_file(tmp_path, [np.nan] + [1.0] * (total - 1))
    else:
        path = tmp_path / "w.txt"
        path.write_text("1\nx\n")
    out = tmp_path / "run"
    one_error_line(["train", "--config", "cpu", "--data-dir", str(cifar_dir), "--out", str(out),
                    "--set", f"data.train_weights={path}", "--set", "train.epochs=1"], expected)
    assert not out.exists()


@pytest.mark.parametrize("config, extra, expected", [
    ("cpu", ["data.mixup_alpha=0.8"], "a mixed image holds two examples"),
    ("dp", [], "not allowed under [privacy]"),
])
def test_combinations_that_cannot_hold_are_refused(cifar_dir, tmp_path, config, extra, expected):
    path = _weights_file(tmp_path, np.ones(_total(cifar_dir)))
    sets = [item for pair in [["--set", f"data.train_weights={path}"]] + [["--set", s] for s in extra] for item in pair]
    one_error_line(["train", "--config", config, "--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"),
                    *sets], "data.train_weights", expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("select", ["limit", "indices"])
def test_each_weight_follows_its_row(cifar_dir, tmp_path, select):
    """Weights equal to the row numbers of train_images.npy: after data.train_limit or data.train_indices and a
    validation split, each training image's weight names the row it came from."""
    from fnclass.data.batches import load_run_data

    total = _total(cifar_dir)
    path = _weights_file(tmp_path, np.arange(total))
    chosen = tmp_path / "chosen.txt"
    chosen.write_text("".join(f"{i}\n" for i in np.random.default_rng(1).choice(total, 300, replace=False)))
    pick = [f"data.train_limit={N}"] if select == "limit" else [f"data.train_indices={chosen}"]
    sets = [s for s in SMALL if not s.startswith("data.train_limit")] + pick
    config = load_config("cpu", sets + [f"data.train_weights={path}", "data.val_size=32"])
    _, ds = load_run_data(config, str(cifar_dir), False, torch.device("cpu"))
    rows = ds.train_weights.long().numpy()
    images = np.load(cifar_dir / "train_images.npy", mmap_mode="r")
    assert len(rows) == len(ds.train_images) == (N if select == "limit" else 300) - 32
    assert np.array_equal(images[rows], ds.train_images.numpy())
    assert np.array_equal(ds.train_rows.numpy(), rows)  # the rows the run records (metagrad's columns)
