"""Capabilities that compose, each against the composition of the single pieces: members with the weight EMA,
gradient statistics and DP-SGD against the single runs of their seeds; the composition table of docs/composition.md
against the refusals in the code."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fnclass import privacy
from fnclass.config import _NOT_PRIVATE, ConfigError, load_config
from fnclass.core import tree
from fnclass.data.batches import load_run_data, normalized
from fnclass.models import resolve_config
from fnclass.training import recipe
from fnclass.training.program import build_program, set_up_run, train
from fnclass.training.wrappers import ema_update

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.widths=[8, 16, 16]", "model.stem_width=8", "data.train_limit=256", "data.test_limit=200",
         "train.batch_size=64", "train.log_every_steps=2", "train.epochs=2"]
SECRET = (1234, 5678)


def _equal(a, b) -> bool:
    """Every leaf of two trees equal, bit for bit."""
    la, lb = tree.tree_leaves(a), tree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def _rows(run: Path, kind: str) -> list[dict]:
    return [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if row["kind"] == kind]


def test_members_keep_the_ema_of_their_single_runs_and_the_ensemble_is_evaluated_on_it(cifar_dir, tmp_path):
    """Loop strategy: each member's EMA equals the single EMA run of its seed bit for bit (same steps, same
    averaging); the summary's EMA ensemble accuracy is that of the mean of the EMA members' logits, computed here
    from the returned weights."""
    ema = ["train.ema_decay=0.9", "train.ema_warmup=true"]
    members = train(load_config("cpu", SMALL + ema + ["members.seeds=[0, 1]", "members.strategy=loop"]),
                    tmp_path / "members", data_dir=str(cifar_dir), device="cpu")
    for seed in (0, 1):
        single = train(load_config("cpu", SMALL + ema + [f"train.seed={seed}"]), tmp_path / f"single{seed}",
                       data_dir=str(cifar_dir), device="cpu")
        assert _equal(tree.tree_index(members.train_state.ema, seed), single.train_state.ema)
        assert not _equal(single.train_state.ema["params"], single.train_state.params)  # an average, not a copy
    start = _start_state("cpu", SMALL + ema + ["members.seeds=[0, 1]"], tmp_path, cifar_dir)
    for a, b in zip(tree.tree_leaves(members.train_state.ema["params"]), tree.tree_leaves(start.ema["params"])):
        assert not torch.equal(a, b)  # every leaf of the average moved (no EMA would leave it at the start)
    config, ds = load_run_data(resolve_config(load_config("cpu", SMALL)), str(cifar_dir), False, torch.device("cpu"))
    model = recipe.create_model(config)
    images = normalized(ds, ds.test_images)
    logits = torch.stack([model.apply(tree.tree_index(members.train_state.ema["params"], i),
                                      tree.tree_index(members.train_state.ema["state"], i), images, train=False)[0]
                          for i in (0, 1)]).mean(0)
    expected = (logits.argmax(1) == ds.test_labels).float().mean().item()
    assert abs(members.summary["ema_test_accuracy"] - expected) < 1e-6
    assert all("ema_test_accuracy" in member for member in members.summary["members"])


def test_a_vmapped_members_ema_is_the_average_of_its_own_update(cifar_dir, tmp_path):
    """vmap strategy, one step (256 images, batch 256, no warm-up): the EMA is ``lerp(start, new, 1 - decay)`` of
    the member's own new weights, to float32 rounding of that one lerp (relative 2 ** -22 of the leaf's scale)."""
    sets = SMALL + ["train.batch_size=256", "train.epochs=1", "train.ema_decay=0.9", "train.ema_warmup=false",
                    "members.seeds=[0, 1]", "members.strategy=vmap"]
    result = train(load_config("cpu", sets), tmp_path / "run", data_dir=str(cifar_dir), device="cpu")
    start = _start_state("cpu", sets, tmp_path, cifar_dir)  # the members' first TrainState, before any step
    ts = result.train_state
    for i in (0, 1):
        expected = ema_update(tree.tree_index(start.ema, i), tree.tree_index(ts.params, i),
                              tree.tree_index(ts.state, i), 0.9)
        got = tree.tree_index(ts.ema, i)
        for a, b in zip(tree.tree_leaves(got), tree.tree_leaves(expected)):
            assert (a - b).abs().max() <= 2 ** -22 * b.abs().max() + 1e-12
        assert not _equal(got, tree.tree_index(start.ema, i))


def test_members_log_the_gradient_statistics_of_their_single_runs(cifar_dir, tmp_path):
    sets = SMALL + ["train.grad_stats_every=2", "train.grad_stats_examples=32"]
    train(load_config("cpu", sets + ["members.seeds=[0, 1]", "members.strategy=loop"]), tmp_path / "members",
          data_dir=str(cifar_dir), device="cpu")
    rows = _rows(tmp_path / "members", "grad_stats")
    for seed in (0, 1):
        train(load_config("cpu", sets + [f"train.seed={seed}"]), tmp_path / f"single{seed}", data_dir=str(cifar_dir),
              device="cpu")
        single = _rows(tmp_path / f"single{seed}", "grad_stats")
        mine = [{k: v for k, v in row.items() if k != "member"} for row in rows if row["member"] == seed]
        assert len(single) == 4 and mine == single  # 2 epochs of 4 steps, every 2nd step


def test_private_members_are_the_private_runs_of_their_seeds(cifar_dir, tmp_path, monkeypatch):
    """Loop strategy, one secret: member i's weights equal the private single run of seed i bit for bit (its own
    Poisson samples and noise); every member has the run's epsilon, and the ensemble's composes K runs."""
    monkeypatch.setattr(privacy, "new_secret", lambda: torch.tensor(SECRET, dtype=torch.int64))
    sets = SMALL + ["train.epochs=1"]
    members = train(load_config("dp", sets + ["members.seeds=[0, 1]", "members.strategy=loop"]),
                    tmp_path / "members", data_dir=str(cifar_dir), device="cpu")
    singles = [train(load_config("dp", sets + [f"train.seed={seed}"]), tmp_path / f"single{seed}",
                     data_dir=str(cifar_dir), device="cpu") for seed in (0, 1)]
    for seed, single in enumerate(singles):
        assert _equal(tree.tree_index(members.train_state.params, seed), single.train_state.params)
    assert not _equal(singles[0].train_state.params, singles[1].train_state.params)
    summary = members.summary
    assert [m["epsilon"] for m in summary["members"]] == [singles[0].summary["privacy"]["epsilon"]] * 2
    assert summary["privacy"]["ensemble_epsilon"] > summary["privacy"]["epsilon"]


def _table() -> list[dict]:
    """docs/composition.md's table: one dict per row (first, second, composes, reason)."""
    rows = []
    for line in (ROOT / "docs" / "composition.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[2] in ("yes", "no"):
            rows.append(dict(zip(("first", "second", "composes", "reason"), cells)))
    return rows


def test_the_composition_table_lists_every_refusal_with_the_codes_reason():
    """Every pair the config refuses under [privacy] is a "no" row with the reason the error gives, and every "no"
    row is a refusal of the code; a "yes" row of config keys loads without error."""
    table = _table()
    refused = {(row["first"], row["second"]): row["reason"] for row in table if row["composes"] == "no"}
    for key, _used, _allowed, why in _NOT_PRIVATE:
        assert refused.get(("[privacy]", f"`{key}`")) == why, key
    values = {"model.norm": '"batch"', "model.whiten": "true", "train.precision": '"fp16"',
              "train.accumulate_steps": "2", "data.mixup_alpha": "0.2", "data.cutmix_alpha": "1.0",
              "train.grad_stats_every": "5", "data.train_weights": '"weights.npy"'}
    for (first, second), why in refused.items():
        key = second.strip("`")
        if first == "[privacy]":
            with pytest.raises(ConfigError, match=re.escape(why)):
                load_config("dp", [f"{key}={values[key]}"])
    for row in table:
        keys = re.findall(r"`(\w+\.\w+) = ([^`]+)`", row["first"] + row["second"])
        if row["composes"] == "yes" and keys and "[privacy]" not in row["first"]:
            load_config("cpu", [f"{k}={v}" for k, v in keys])
    composes = {(row["first"], row["second"].split(" = ")[0]) for row in table if row["composes"] == "yes"}
    assert composes >= {("members", "`train.ema_decay"), ("members", "`train.grad_stats_every"),
                        ("members", "[privacy]"), ("members", "torchrun"), ("[privacy]", "torchrun"),
                        ("`fnclass grads --score`", "torchrun"),
                        ("`fnclass influence`", "torchrun")}, composes  # the pairs issue 25 made compose


def test_the_table_names_a_test_for_every_pair_that_composes():
    """A "yes" row names the test that holds it (its reason column), and that test exists in tests/."""
    source = "\n".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    for row in _table():
        if row["composes"] == "yes":
            names = re.findall(r"`(test_\w+)`", row["reason"])
            assert names and all(f"def {name}(" in source for name in names), row


def test_a_sweep_of_a_shape_is_refused_for_a_stated_reason(cifar_dir, tmp_path):
    from tests.oneline import one_error_line

    one_error_line(["train", "--config", "cpu", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"),
                    "--sweep", "model.widths=8,16"], "model.widths changes the model's shapes or the program")
    assert not (tmp_path / "run").exists()


def test_private_training_over_two_processes_equals_one_process(cifar_dir, tmp_path):
    """[privacy] under torchrun: the Poisson batch sharded, the clipped sums all-reduced, the noise drawn once from
    the shared secret and step key. Equal to one process up to the summation order of the clipped sums: float32
    rounding of a sum of ~64 clipped gradients (64 * 2 ** -24 relative to the update) carried through 4 momentum
    steps stays below 1e-4 of each leaf's scale; dropping the all-reduce or drawing the noise per process moves the
    weights by the size of an update (checked)."""
    from fnclass.run.checkpoint import load_checkpoint
    from tests.test_distributed import _env, torchrun

    sets = [s.replace("train.epochs=2", "train.epochs=1") for s in SMALL if "widths" not in s and "stem" not in s]
    sets += ["model.widths=[8, 16, 32]", "train.log_every_steps=1"]
    one = subprocess.run([sys.executable, "-m", "tests.private_train_check", str(cifar_dir), str(tmp_path / "one"),
                          *sets], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "tests.private_train_check", str(cifar_dir), str(tmp_path / "two"), *sets)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.safetensors").params
    b = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.safetensors").params
    start = _start_state("dp", sets, tmp_path, cifar_dir).params
    for (path, x), y, s in zip(tree.flatten_paths(a).items(), tree.flatten_paths(b).values(),
                               tree.flatten_paths(start).values()):
        moved = (x - s).abs().max()
        assert moved > 0, path  # the run trained
        assert (x - y).abs().max() <= 1e-4 * x.abs().max() + 1e-7, path
    rows = [_rows(tmp_path / run, "epoch")[0] for run in ("one", "two")]
    assert rows[0]["epsilon"] == rows[1]["epsilon"] and rows[0]["poisson_overflow"] == rows[1]["poisson_overflow"]
    assert abs(rows[0]["train_loss"] - rows[1]["train_loss"]) <= 1e-5 * abs(rows[0]["train_loss"])


def _start_state(name: str, sets: list[str], tmp_path, cifar_dir):
    """The TrainState a run of config ``name`` with ``sets`` starts from (built, not trained)."""
    setup = set_up_run(load_config(name, sets), tmp_path / f"start-{name}", data_dir=str(cifar_dir), device="cpu",
                       download=False, resume=False, reporter=None)
    train_state = build_program(setup).train_state
    setup.run.close()
    return train_state
