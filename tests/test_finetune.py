"""Fine-tuning (`--init-from`): the source's weights against the fresh run's, the head re-initialised when the
classes change, and a run on real CIFAR-10 classes the source never saw that starts above a scratch run."""

import json

import pytest
import torch
from click.testing import CliRunner

import fnclass
from fnclass.cli import main
from fnclass.config import load_config
from fnclass.core import optim, tree
from fnclass.data import load_split, write_dataset
from fnclass.models import resolve_config
from fnclass.run.checkpoint import CheckpointError, save_checkpoint
from fnclass.training import recipe
from fnclass.training.finetune import init_from, load_source
from fnclass.training.step import create_train_state

SMALL = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8"]


def _saved(tmp_path, classes: int, sets=SMALL, ema=False):
    """A trained-looking checkpoint of ``classes`` classes (random weights from key 7, one update of the head)."""
    config = resolve_config(load_config(None, [*sets, f"model.num_classes={classes}"]))
    model = fnclass.build_model(config.model)
    opt = recipe.create_optimizer(config.optim, model.param_labels, 10, 1)
    ts = create_train_state(model, opt, fnclass.key(7), ema=ema)
    path = tmp_path / f"source{classes}.safetensors"
    save_checkpoint(path, ts, config=config, classes=[f"c{i}" for i in range(classes)], mean=(0.5,) * 3,
                    std=(0.25,) * 3, input_size=(32, 32))
    return path, ts


def _fresh(classes: int, sets=SMALL):
    config = resolve_config(load_config(None, [*sets, f"model.num_classes={classes}"]))
    model = fnclass.build_model(config.model)
    opt = optim.chain(optim.trace(0.9), optim.scale_by_learning_rate(0.1))
    return model, opt, create_train_state(model, opt, fnclass.key(1), ema=True)


@pytest.mark.parametrize("classes", [10, 4])
def test_init_from_takes_every_leaf_but_a_resized_head(tmp_path, classes):
    path, source = _saved(tmp_path, 10)
    model, opt, fresh = _fresh(classes)
    started, info = init_from(fresh, model, opt, load_source(path), path=path, input_size=(32, 32))
    mine, theirs, new = (tree.flatten_paths(t.params) for t in (fresh, source, started))
    head = {"head.weight", "head.bias"} & set(mine)
    for name in mine:
        expected = mine[name] if classes != 10 and name in head else theirs[name]
        assert torch.equal(new[name], expected), name
    assert info.head_reinitialised == (classes != 10) and info.classes == tuple(f"c{i}" for i in range(10))
    assert tree.tree_allclose(started.state, source.state, rtol=0, atol=0)  # BatchNorm statistics too
    assert tree.tree_allclose(started.opt_state, opt.init(started.params), rtol=0, atol=0)  # a fresh optimizer
    assert tree.tree_allclose(started.ema["params"], started.params, rtol=0, atol=0)  # the EMA starts there
    assert int(started.step) == 0


def test_init_from_refuses_another_model_in_one_line(tmp_path):
    path, _ = _saved(tmp_path, 10, sets=["model.name=tiny", "model.widths=[8, 16, 32]", "model.stem_width=8"])
    model, opt, fresh = _fresh(10)
    with pytest.raises(CheckpointError, match="the source's model differs from this run's") as error:
        init_from(fresh, model, opt, load_source(path), path=path, input_size=(32, 32))
    assert len(str(error.value).splitlines()) == 1
    with pytest.raises(CheckpointError, match="takes 32x32 images but this run's are 28x28"):
        init_from(fresh, model, opt, load_source(_saved(tmp_path, 10)[0]), path=path, input_size=(28, 28))


def _classes_subset(cifar_dir, folder, keep, train_range, test_limit):
    """Real CIFAR-10 images of the classes ``keep`` (relabelled 0..), written as a data folder."""
    images, labels = load_split(cifar_dir, "train", limit=train_range[1])
    images, labels = images[train_range[0]:], labels[train_range[0]:]
    test_images, test_labels = load_split(cifar_dir, "test", limit=test_limit)
    names = (cifar_dir / "classes.txt").read_text().split()
    remap = torch.full((10,), -1, dtype=torch.int64)
    remap[torch.tensor(keep)] = torch.arange(len(keep))
    chosen, chosen_test = remap[labels] >= 0, remap[test_labels] >= 0
    write_dataset(folder, images[chosen].numpy(), remap[labels[chosen]].numpy(), test_images[chosen_test].numpy(),
                  remap[test_labels[chosen_test]].numpy(), [names[k] for k in keep])
    return folder


def test_fine_tuning_on_unseen_classes_starts_above_a_scratch_run(cifar_dir, tmp_path):
    """The source learns 6 CIFAR-10 classes (airplane..dog); the target is the other 4 (frog, horse, ship, truck),
    about 400 images, one epoch. Fine-tuned and scratch runs share the config, seed and data."""
    source_data = _classes_subset(cifar_dir, tmp_path / "six", [0, 1, 2, 3, 4, 5], (0, 6000), 1000)
    target_data = _classes_subset(cifar_dir, tmp_path / "four", [6, 7, 8, 9], (10000, 11000), 2000)
    sets = ["model.widths=[24, 48, 96]", "train.batch_size=100", "train.tta=false", "train.log_every_steps=0"]
    args = lambda data, out, *extra: ["train", "--config", "cpu", "--data-dir", str(data), "--out", str(out),
                                      *[a for s in [*sets, *extra] for a in ("--set", s)]]
    source = CliRunner().invoke(main, [*args(source_data, tmp_path / "source", "train.epochs=6"), "--quiet"])
    assert source.exit_code == 0, source.output
    checkpoint = tmp_path / "source/checkpoints/last.safetensors"
    tuned = CliRunner().invoke(main, [*args(target_data, tmp_path / "tuned", "train.epochs=1"),
                                      "--init-from", str(checkpoint)])
    assert tuned.exit_code == 0, tuned.output
    assert f"starting from {checkpoint}" in tuned.output and "the head is re-initialised" in tuned.output
    assert "(6 classes there, 4 here)" in tuned.output
    scratch = CliRunner().invoke(main, [*args(target_data, tmp_path / "scratch", "train.epochs=1"), "--quiet"])
    assert scratch.exit_code == 0, scratch.output
    tuned_summary, scratch_summary = (json.loads((tmp_path / name / "summary.json").read_text())
                                      for name in ("tuned", "scratch"))
    assert tuned_summary["init_from"] == str(checkpoint) and scratch_summary["init_from"] is None
    print("fine-tuned", tuned_summary["test_accuracy"], "scratch", scratch_summary["test_accuracy"])
    assert tuned_summary["test_accuracy"] > scratch_summary["test_accuracy"] + 0.05
