"""Data parallelism with torchrun on the CPU (Gloo), in real processes: the same training as one process at the
same global batch, one writer, resume across world sizes, a dead process, a refused batch size; the analyses
(gradients, scores, attribution) sharded over the processes equal to one process."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from fnclass.core import tree
from fnclass.run.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8", "model.whiten=false",
         "model.dirac_init=false", "optim.whiten_bias_epochs=0", "optim.muon=false", "data.train_limit=512",
         "data.test_limit=200", "train.epochs=2", "train.batch_size=128", "train.log_every_steps=1",
         "train.channels_last=false", "train.tta=false"]


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(*args, nproc=2, env=None, timeout=300, extra=()):
    """``torchrun --nproc-per-node N [extra] ARGS`` as a subprocess (the launcher's own module)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), *extra, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or _env(), timeout=timeout)


def fnclass(*args, env=None):
    """``python -m fnclass ARGS``; with ``FNCLASS_KILL_AT`` in ``env``, through tests/faults.py (the kill wrapped)."""
    module = "tests.faults" if (env or {}).get("FNCLASS_KILL_AT") else "fnclass"
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or _env(), timeout=300)


def _train_args(cifar_dir, out, sets=SMALL):
    return ["train", "--config", "cpu", "--data-dir", str(cifar_dir), "--out", str(out), "--quiet",
            *[a for s in sets for a in ("--set", s)]]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_data_parallel_steps_are_one_process_steps(cifar_dir, tmp_path):
    """2 processes x 64 images against 1 x 128, synchronised BatchNorm, 4 steps of Nesterov SGD on real images.

    Tolerance: float32 rounding differs with the summation order (per-shard sums, then an all-reduce), so the
    measure is float64: the data-parallel run and the single float32 run are two float32 computations of the same
    steps, and neither sums in the better order, so each is as far from the float64 run as the other only in
    distribution. The bound is twice the single run's distance, after one update (rounding alone; measured on the
    2-core AMD EPYC: data parallel 2.1e-6, single 3.3e-5) and after four (this small BatchNorm net at lr 0.05
    amplifies rounding about a thousandfold, through max-pool choices: 0.031 and 0.093). A data-parallel step that
    does not synchronise BatchNorm is 0.57 off after one update and 1.02 after four; the first step's loss agrees to
    float32 rounding."""
    out = tmp_path / "check.json"
    result = torchrun("-m", "tests.distributed_check", str(cifar_dir), str(out))  # this checkout, not an install
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads(out.read_text())
    assert check["world_size"] == 2 and check["ranks_identical"]  # every process holds the same TrainState
    assert check["unsynced_ranks_identical"]  # also with train.sync_batchnorm = false
    assert check["first_parallel_vs_float64"] <= 2 * check["first_single_vs_float64"], check
    assert check["parallel_vs_float64"] <= 2 * check["single_vs_float64"], check
    assert (check["compiled_graphs"], check["compiled_breaks"]) == (1, 0)  # the all-reduces trace into the graph
    assert check["compiled_vs_eager"] < 1e-4, check  # one update: rounding apart (inductor reorders the sums)
    (loss, correct), (single_loss, single_correct) = check["logged"][0], check["single_logged"][0]
    assert abs(loss - single_loss) <= 1e-6 * abs(single_loss) and correct == single_correct


def test_torchrun_train_matches_one_process_and_resumes_in_one(cifar_dir, tmp_path):
    """`fnclass train` under torchrun against one process, through the whole command: the losses of the first three
    steps agree closely. cpu.toml's warm-up starts at lr 0, so the first update is zero and step 3's loss is the
    first to follow a real update: measured 1.6e-7, 0 and 1.6e-6 relative on the 2-core AMD EPYC, where summing the
    shards' gradients instead of averaging them (a 2x update) moves step 3 by 2.5e-2; the bound 1e-4 sits between.
    Later steps drift apart as rounding is amplified (0.26% by step 8, measured) and the 200-image test accuracy
    after 8 steps is near chance, so neither is compared; tests.distributed_check compares the parameters against
    float64."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert fnclass(*_train_args(cifar_dir, one)).returncode == 0
    result = torchrun("-m", "fnclass", *_train_args(cifar_dir, two))
    assert result.returncode == 0, result.stderr[-3000:]
    rows_one, rows_two = _rows(one), _rows(two)
    assert [(r["kind"], r["step"]) for r in rows_one] == [(r["kind"], r["step"]) for r in rows_two]  # logged once
    for step in (0, 1, 2):  # the losses before and after the first two updates (the first is zero: warm-up)
        assert rows_two[step]["loss"] == pytest.approx(rows_one[step]["loss"], rel=1e-4), (step, rows_two[step])
    summary = json.loads((two / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["train_images"] == 512
    assert not list(two.glob("**/.*.tmp"))  # one writer: no half-written leftovers of a second one
    # the evaluation was sharded over the 2 processes and gathered: exactly one process's evaluation of the weights
    evaluated = fnclass("eval", str(two / "checkpoints/last.safetensors"), "--data-dir", str(cifar_dir), "--limit",
                        "200", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert json.loads(evaluated.stdout)["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    # rank 1 dies mid-epoch 2 (step 6): torchrun ends the job; the epoch-1 checkpoint is intact and a single
    # process resumes it (another world size: the global batch is what counts)
    dead = tmp_path / "dead"
    killed = torchrun("-m", "tests.faults", *_train_args(cifar_dir, dead), env=_env(FNCLASS_KILL_AT="step:6@1"))
    assert killed.returncode != 0
    assert load_checkpoint(dead / "checkpoints/last.safetensors").step == 4
    resumed = fnclass("train", "--resume", str(dead), "--data-dir", str(cifar_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((dead / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 8
    assert [(r["kind"], r["step"]) for r in _rows(dead)] == [(r["kind"], r["step"]) for r in rows_two]


def test_two_nodes_through_torchruns_rendezvous_equal_one_node(cifar_dir, tmp_path):
    """Two 'machines' (two torchrun launchers, one process each) meeting at a c10d rendezvous on this host."""
    node_args = lambda rank: ["--nnodes", "2", "--node-rank", str(rank), "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", "127.0.0.1:29517", "--rdzv-id", "fnclass-test"]
    out = tmp_path / "nodes"
    launch = lambda rank: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", *node_args(rank), "-m", "fnclass",
         *_train_args(cifar_dir, out)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    nodes = [launch(0), launch(1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    single = tmp_path / "single-node"
    assert torchrun("-m", "fnclass", *_train_args(cifar_dir, single)).returncode == 0
    a = safetensors.torch.load_file(out / "checkpoints/last.safetensors")
    b = safetensors.torch.load_file(single / "checkpoints/last.safetensors")
    assert all((a[k] == b[k]).all() for k in a)  # the same 2 processes, the same arithmetic: bit for bit


def test_a_batch_that_does_not_divide_is_refused_in_one_line(cifar_dir, tmp_path):
    result = torchrun("-m", "fnclass", *_train_args(cifar_dir, tmp_path / "odd", [*SMALL, "train.batch_size=127"]))
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "train.batch_size = 127 does not divide among 2 processes" in ours[0]
    assert not (tmp_path / "odd").exists()


def test_grads_over_two_processes_equal_one_process(cifar_dir, tmp_path):
    """`fnclass grads` sharded over 2 processes: the CSV (written by rank 0, in the split's order) and the reduced
    statistics equal one process's, to float32 rounding of the reduction order."""
    checkpoint = tmp_path / "run/checkpoints/last.safetensors"
    assert fnclass(*_train_args(cifar_dir, tmp_path / "run", [*SMALL, "train.epochs=1"])).returncode == 0
    args = lambda out: ["grads", str(checkpoint), "--data-dir", str(cifar_dir), "--limit", "101", "--chunk-size",
                        "16", "--out", str(out), "--json"]
    one = fnclass(*args(tmp_path / "one"))
    two = torchrun("-m", "fnclass", *args(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    report_one, report_two = json.loads(one.stdout), json.loads(two.stdout.strip().splitlines()[-1])
    assert report_two["processes"] == 2 and report_two["num_examples"] == 101  # 51 + 50: uneven shards
    for key in ("mean_loss", "accuracy", "mean_grad_norm"):
        assert report_two[key] == pytest.approx(report_one[key], rel=1e-5), key
    for key in ("b_simple", "trace_sigma", "mean_grad_sq_norm"):
        assert report_two["noise_scale"][key] == pytest.approx(report_one["noise_scale"][key], rel=1e-4), key
    assert report_two["top_indices"][:10] == report_one["top_indices"][:10]
    rows_one = (tmp_path / "one/per_example.csv").read_text().splitlines()
    rows_two = (tmp_path / "two/per_example.csv").read_text().splitlines()
    assert len(rows_two) == 102 and [r.split(",")[:3] for r in rows_two] == [r.split(",")[:3] for r in rows_one]
    for a, b in zip(rows_one[1:], rows_two[1:]):
        assert [float(x) for x in a.split(",")[3:]] == pytest.approx([float(x) for x in b.split(",")[3:]], rel=1e-4)


EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def along_run(cifar_dir, tmp_path_factory):
    """A small run that keeps its two epoch-end checkpoints (what TracIn sums over), 512 training images."""
    out = tmp_path_factory.mktemp("along") / "run"
    result = fnclass(*_train_args(cifar_dir, out, [*SMALL, "checkpoint.every_epochs=1"]))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _num_params(run) -> int:
    return tree.num_params(load_checkpoint(run / "checkpoints/last.safetensors").params)


def _one_and_two(args):
    """``fnclass ARGS(one)`` in one process and ``torchrun --nproc-per-node 2 -m fnclass ARGS(two)``, with --json:
    both succeed and only rank 0 prints the report (one line)."""
    one, two = fnclass(*args("one")), torchrun("-m", "fnclass", *args("two"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(two.stdout.strip().splitlines()) == 1, two.stdout[-3000:]
    return json.loads(one.stdout), json.loads(two.stdout)


def _close(one: np.ndarray, two: np.ndarray, length: int) -> None:
    """Equal up to float32 rounding of a reduction of ``length`` terms, relative to the largest value: each run is
    within ``length x eps x scale`` of the exact value (the standard bound for a sum), so within twice that of the
    other whatever order each summed in."""
    assert one.shape == two.shape
    tolerance = 2 * length * EPS * float(np.abs(one).max())
    assert float(np.abs(one - two).max()) <= tolerance, (float(np.abs(one - two).max()), tolerance)


def _same_ranking(one: list[dict], two: list[dict], index: str, score_of: dict, tolerance: float) -> None:
    """Two rankings (CSV rows, best first) list the same examples at each rank, or two whose one-process scores are
    within ``tolerance`` (a near tie that rounding may order either way), with scores within ``tolerance``."""
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        assert abs(float(a["score"]) - float(b["score"])) <= tolerance, (a, b)
        if a[index] != b[index]:
            assert abs(score_of[a[index]] - score_of[b[index]]) <= 2 * tolerance, (a, b)
        else:
            assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}


def _csv(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize("method", ["el2n", "grand"])
def test_scores_over_two_processes_equal_one_process(cifar_dir, along_run, tmp_path, method):
    """`fnclass grads --score` sharded over 2 processes (128 + 127 images, chunks of 32 in both runs): scores.csv,
    scores.json and kept_indices.txt equal one process's. An example's score is computed from that example alone,
    so only a kernel's summation order can differ: over an image's 32 x 32 positions for EL2N, over the P squared
    gradient entries for GraNd."""
    checkpoint = along_run / "checkpoints/last.safetensors"
    args = lambda name: ["grads", str(checkpoint), "--data-dir", str(cifar_dir), "--limit", "255", "--chunk-size",
                         "32", "--score", method, "--keep-fraction", "0.3", "--out", str(tmp_path / name), "--json"]
    summary_one, summary_two = _one_and_two(args)
    assert (summary_one["processes"], summary_two["processes"]) == (1, 2)
    assert summary_two == json.loads((tmp_path / "two/scores.json").read_text())  # rank 0 wrote what it printed
    for key in ("method", "num_examples", "members", "kept", "chunk_size"):
        assert summary_two[key] == summary_one[key], key
    rows_one, rows_two = _csv(tmp_path / "one/scores.csv"), _csv(tmp_path / "two/scores.csv")
    assert [(r["index"], r["label"]) for r in rows_two] == [(r["index"], r["label"]) for r in rows_one]
    scores_one = np.array([float(r["score"]) for r in rows_one])
    scores_two = np.array([float(r["score"]) for r in rows_two])
    length = 32 * 32 if method == "el2n" else _num_params(along_run)
    _close(scores_one, scores_two, length)
    tolerance = 2 * length * EPS * float(np.abs(scores_one).max())
    assert summary_two["mean_score"] == pytest.approx(summary_one["mean_score"], abs=tolerance)
    score_of = {str(i): float(s) for i, s in enumerate(scores_one)}
    top = lambda summary: [{"index": str(r["index"]), "score": r["score"]} for r in summary["top"]]
    _same_ranking(top(summary_one), top(summary_two), "index", score_of, tolerance)
    kept_one = {int(i) for i in (tmp_path / "one/kept_indices.txt").read_text().split()}
    kept_two = {int(i) for i in (tmp_path / "two/kept_indices.txt").read_text().split()}
    threshold = float(np.sort(scores_one)[::-1][len(kept_one) - 1])  # the lowest score kept
    assert len(kept_one) == len(kept_two) == 77  # ceil(0.3 x 255)
    assert all(abs(scores_one[i] - threshold) <= 2 * tolerance for i in kept_one ^ kept_two)  # near ties only


@pytest.mark.parametrize("mode", ["tracin", "self", "trak"])
def test_influence_over_two_processes_equal_one_process(cifar_dir, along_run, tmp_path, mode):
    """`fnclass influence` over the run's 2 checkpoints, sharded over 2 processes (128 + 127 training rows, chunks
    of 32 in both runs): scores.npy and the CSV rankings equal one process's.

    Tolerances: TracIn's columns and the self-influences are each computed on one process, from the same chunks,
    so only a kernel's order over the P gradient entries can differ. TRAK's Phi^T Phi is a sum over the 255
    training rows split across the processes, reordered (in float64, then the scores rounded to float32): 255
    terms."""
    extra = {"tracin": ["--test-indices", "0-7"], "self": ["--self"],
             "trak": ["--method", "trak", "--proj-dim", "64", "--test-indices", "0-7"]}[mode]
    args = lambda name: ["influence", str(along_run), "--data-dir", str(cifar_dir), "--train-limit", "255",
                         "--chunk-size", "32", *extra, "--out", str(tmp_path / name), "--json"]
    report_one, report_two = _one_and_two(args)
    assert (report_one["processes"], report_two["processes"]) == (1, 2)
    assert report_two["models"] == report_one["models"] == 2 and report_two["train_examples"] == 255
    length = 255 if mode == "trak" else _num_params(along_run)
    if mode == "self":
        rows_one = _csv(tmp_path / "one/self_influence.csv")
        rows_two = _csv(tmp_path / "two/self_influence.csv")
        scores_one = {r["index"]: float(r["score"]) for r in rows_one}
        scores_two = {r["index"]: float(r["score"]) for r in rows_two}
        assert sorted(scores_two) == sorted(scores_one) and len(scores_one) == 255
        indices = sorted(scores_one)
        _close(np.array([scores_one[i] for i in indices]), np.array([scores_two[i] for i in indices]), length)
        tolerance = 2 * length * EPS * max(abs(v) for v in scores_one.values())
        _same_ranking(rows_one, rows_two, "index", scores_one, tolerance)
        return
    load = lambda name, what: np.load(tmp_path / name / what, allow_pickle=False)
    assert (load("two", "train_indices.npy") == load("one", "train_indices.npy")).all()
    scores_one, scores_two = load("one", "scores.npy"), load("two", "scores.npy")
    assert scores_one.shape == (8, 255)
    _close(scores_one, scores_two, length)
    tolerance = 2 * length * EPS * float(np.abs(scores_one).max())
    rows_one, rows_two = _csv(tmp_path / "one/influence.csv"), _csv(tmp_path / "two/influence.csv")
    train_rows = [str(int(row)) for row in load("one", "train_indices.npy")]
    pick = lambda rows, test, kind: [r for r in rows if (r["test"], r["kind"]) == (str(test), kind)]
    for test in range(8):  # each test example's proponents and opponents, against its row of scores.npy
        score_of = dict(zip(train_rows, scores_one[test].tolist()))
        for kind in ("proponent", "opponent"):
            _same_ranking(pick(rows_one, test, kind), pick(rows_two, test, kind), "train_index", score_of, tolerance)


MEMBERS = [*SMALL, "members.strategy=loop"]  # each member's step is the single run's: equal bit for bit
SEEDS, SWEEP = ["--seeds", "0-2"], ["--sweep", "optim.lr=0.05,0.1,0.2"]  # 3 members: blocks of 2 and 1


def _members_args(cifar_dir, out, sets=MEMBERS, members=SEEDS):
    return [*_train_args(cifar_dir, out, sets), *members]


def _same_run(one, two):
    """Two runs of the same members: checkpoints equal bit for bit (every member's parameters, BatchNorm statistics,
    optimizer state and key; the loop strategy makes each member's steps the same computations in any process), and
    the same metrics.jsonl lines (every member's step losses and epoch rows) but for timings."""
    a = safetensors.torch.load_file(one / "checkpoints/last.safetensors")
    b = safetensors.torch.load_file(two / "checkpoints/last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    members = load_checkpoint(two / "checkpoints/last.safetensors").members
    assert len(members) == 3 and members == load_checkpoint(one / "checkpoints/last.safetensors").members
    timeless = lambda rows: [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")}
                             for row in rows if row["kind"] in ("step", "member_epoch", "epoch")]
    assert timeless(_rows(one)) == timeless(_rows(two))


@pytest.fixture(scope="module")
def members_one(cifar_dir, tmp_path_factory):
    """Three members (seeds 0-2) trained in one process: what a torchrun job of them must equal."""
    out = tmp_path_factory.mktemp("members") / "one"
    result = fnclass(*_members_args(cifar_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("members", [SEEDS, SWEEP], ids=["seeds", "sweep"])
def test_members_under_torchrun_are_the_one_process_members(cifar_dir, members_one, tmp_path, members):
    """3 members over 2 processes (blocks of 2 and 1, each with its own seeds and swept values, no all-reduce between
    them): the checkpoint rank 0 writes holds all 3, equal bit for bit to one process's, and the evaluation (rows
    sharded, every member on every process) gives the same members' and ensemble's accuracies."""
    one, two = members_one, tmp_path / "two"
    if members != SEEDS:
        one = tmp_path / "one"
        assert fnclass(*_members_args(cifar_dir, one, members=members)).returncode == 0
    result = torchrun("-m", "fnclass", *_members_args(cifar_dir, two, members=members))
    assert result.returncode == 0, result.stderr[-3000:]
    _same_run(one, two)
    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((two / "summary.json").read_text())
    accuracies = lambda summary: [m["test_accuracy"] for m in summary["members"]]
    assert len(summary_two["members"]) == 3 and accuracies(summary_two) == accuracies(summary_one)
    assert summary_two["ensemble_test_accuracy"] == summary_one["ensemble_test_accuracy"]
    assert summary_two["steps"] == 8 and not list(two.glob("**/.*.tmp"))  # one writer


def test_members_killed_under_torchrun_resume_in_one_process(cifar_dir, members_one, tmp_path):
    """Rank 1 (member 2) dies after step 8; the checkpoint of step 6 (mid-epoch 2: every member's state and epoch
    sums so far, gathered) resumes in one process and ends equal to the run never stopped. Step 8 is the first
    safe kill: both processes met at step 7, after rank 0 had written step 6."""
    out = tmp_path / "killed"
    sets = [*MEMBERS, "checkpoint.every_steps=3"]
    killed = torchrun("-m", "tests.faults", *_members_args(cifar_dir, out, sets),
                      env=_env(FNCLASS_KILL_AT="step:8@1"))
    assert killed.returncode != 0
    assert load_checkpoint(out / "checkpoints/last.safetensors").step == 6
    resumed = fnclass("train", "--resume", str(out), "--data-dir", str(cifar_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 6
    _same_run(members_one, out)


def test_members_killed_in_one_process_resume_under_torchrun(cifar_dir, members_one, tmp_path):
    """The other way: one process's mid-epoch checkpoint (step 6 of all 3 members) resumed by 2 processes, each
    taking its block of the members and of the epoch's sums so far."""
    out = tmp_path / "killed"
    sets = [*MEMBERS, "checkpoint.every_steps=3"]
    killed = fnclass(*_members_args(cifar_dir, out, sets), env=_env(FNCLASS_KILL_AT="step:7"))
    assert killed.returncode != 0
    assert load_checkpoint(out / "checkpoints/last.safetensors").step == 6
    resumed = torchrun("-m", "fnclass", "train", "--resume", str(out), "--data-dir", str(cifar_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(members_one, out)


def test_members_that_leave_a_process_without_one_are_refused_in_one_line():
    """Blocks of ceil(K / P) members: 3 over 2 processes are 2 + 1; 5 over 4 would leave process 3 none."""
    from fnclass.distributed import Process
    from fnclass.distributed.members import member_blocks
    from fnclass.errors import InputError

    assert [member_blocks(3, Process(rank, 2, rank, None)).block for rank in (0, 1)] == [range(0, 2), range(2, 3)]
    assert member_blocks(3, None).block == range(3)
    with pytest.raises(InputError) as refused:
        member_blocks(5, Process(0, 4, 0, None))
    assert str(refused.value) == ("5 members (--seeds, --sweep) over 4 processes leave process 3 without one (each "
                                  "process trains a block of up to 2 whole members): run 3 processes (torchrun "
                                  "--nproc-per-node 3), or train more members")


def test_a_process_of_a_job_leaves_with_its_exit_code_and_flushed_output(cifar_dir, tmp_path):
    """Real torchrun jobs of the command line (tests/exit_check.py: ``python -m fnclass`` with an interpreter-exit
    handler that reports the interpreter's finalization): every process that joined the job leaves through
    ``os._exit`` (no finalization, where a Gloo worker thread can abort it) with the command's own exit code, its
    output flushed; a process that joined no job exits normally."""
    finalized = "interpreter finalization ran"
    args = [arg if arg != "--quiet" else "--json" for arg in _train_args(cifar_dir, tmp_path / "done",
                                                                          [*SMALL, "train.epochs=1"])]
    done = torchrun("-m", "tests.exit_check", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["steps"] == 4  # rank 0's report (the only one), flushed and whole
    assert finalized not in done.stdout + done.stderr
    refused = torchrun("-m", "tests.exit_check", *_train_args(cifar_dir, tmp_path / "odd",
                                                               [*SMALL, "train.batch_size=127"]))
    assert refused.returncode != 0 and refused.stderr.count("exitcode  : 2") == 2  # both ranks: the command's code
    assert [line for line in refused.stderr.splitlines() if line.startswith("error: ")] == [
        "error: train.batch_size = 127 does not divide among 2 processes: set it to a multiple of 2 (e.g. 126)"]
    assert finalized not in refused.stderr
    alone = subprocess.run([sys.executable, "-m", "tests.exit_check", "train", "--set", "optim.lr=-1"],
                           capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert alone.returncode == 2 and finalized in alone.stderr  # no job joined: a normal exit
