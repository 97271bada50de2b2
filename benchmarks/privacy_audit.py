"""An empirical privacy audit of `fnclass train` under ``[privacy]``: one training run with gradient canaries
(Steinke, Nasr and Jagielski 2023; :mod:`fnclass.privacy.audit`), the audited lower bound on epsilon against the
claimed epsilon; then the same run with its noise removed, which the audit must catch.

Run by hand from the repository root::

    python -m benchmarks.privacy_audit --data-dir ../shared/data/cifar10 [--config dp] [--set KEY=VALUE ...]
        [--canaries 100000] [--runs noisy,noiseless] [--json audit.json]

Each run is ``fnclass.train`` on the config (dp.toml by default; ``--set`` shortens it) with its DP gradient wrapped
by :func:`fnclass.privacy.audit.with_canaries`. The noiseless run is the test-only switch the audit exists to catch:
the step adds no noise while the run is planned, accounted and reported with the config's noise multiplier, so its
summary claims the same epsilon. The canaries' coordinates and inclusions come from ``--audit-seed`` (the auditor's
key; the run never sees it), the confidence is 95%.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import optree
import torch

from benchmarks.common import device_name, publish
from fnclass import privacy
from fnclass.config import load_config
from fnclass.core import random
from fnclass.core.tree import num_params
from fnclass.models import build_model, resolve_config
from fnclass.privacy import audit as audit_module
from fnclass.training.program import train


def audited_run(config, out: Path, data_dir: str, *, canaries: int, noise: bool = True, audit_seed: int = 0) -> dict:
    """Train ``config`` (with ``[privacy]``) with ``canaries`` gradient canaries in its DP gradient (``noise=False``:
    the noise removed from the step, nothing else changed), then audit it. Returns the run's claimed epsilon, delta,
    the audit and the run's test accuracy."""
    model = build_model(resolve_config(config).model)
    canary_set = audit_module.gradient_canaries(random.key(audit_seed), num_params(model.init(random.key(0))[0]),
                                                canaries, config.privacy.max_grad_norm)
    real, plan_real, made = privacy.clipped_noisy_gradient, privacy.plan, {}

    # The program plans the run through privacy.plan (its sampling rate) and builds its DP gradient through
    # privacy.clipped_noisy_gradient: the canaries wrap it there.
    def plan(*args, **kwargs):
        made["rate"] = (resolved := plan_real(*args, **kwargs)).sample_rate
        return resolved

    def wrapped(max_grad_norm, noise_multiplier, expected_batch_size, **options):
        gradient = real(max_grad_norm, noise_multiplier if noise else 0.0, expected_batch_size, **options)
        made["gradient"] = audit_module.with_canaries(gradient, canary_set, made["rate"], expected_batch_size)
        return made["gradient"]

    privacy.clipped_noisy_gradient, privacy.plan = wrapped, plan
    try:
        tick = time.perf_counter()
        result = train(config, out, data_dir=data_dir)
        seconds = time.perf_counter() - tick
    finally:
        privacy.clipped_noisy_gradient, privacy.plan = real, plan_real
    scores = audit_module.scores(canary_set, made["gradient"].initial, optree.tree_leaves(result.train_state.params))
    summary = result.summary["privacy"]
    found = audit_module.audit(scores, canary_set.included, summary["delta"])
    return {"noise": noise, "claimed_epsilon": summary["epsilon"], "delta": summary["delta"],
            "noise_multiplier": summary["noise_multiplier"], "steps": summary["steps"],
            "sample_rate": summary["sample_rate"], "test_accuracy": result.summary.get("test_accuracy"),
            "seconds": seconds, **found._asdict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--config", default="dp")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--canaries", type=int, default=100_000)
    parser.add_argument("--runs", default="noisy,noiseless")
    parser.add_argument("--audit-seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    config = load_config(args.config, args.sets)
    results = []
    for name in args.runs.split(","):
        with tempfile.TemporaryDirectory() as folder:
            results.append(audited_run(config, Path(folder) / "run", args.data_dir, canaries=args.canaries,
                                       noise=name == "noisy", audit_seed=args.audit_seed))
        print(json.dumps(results[-1]), flush=True)
    rows = [f"| {'with noise' if r['noise'] else 'noise removed (test-only switch)'} | {r['claimed_epsilon']:.2f} | "
            f"**{r['epsilon_lower_bound']:.2f}** | {r['correct']} of {r['guesses']} (k = {r['k']}) | "
            f"{r['test_accuracy']:.2%} | {r['seconds']:.0f} s |" for r in results]
    where = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    table = "\n".join([
        f"{where}; config {args.config} {' '.join(args.sets)}; {args.canaries} canaries; delta "
        f"{results[0]['delta']:g}; noise multiplier {results[0]['noise_multiplier']:.3f}, "
        f"{results[0]['steps']} steps at rate {results[0]['sample_rate']:.4f}",
        "| run | claimed epsilon | audited lower bound (95%) | right guesses | test accuracy | train |",
        "| --- | ---: | ---: | ---: | ---: | ---: |", *rows])
    publish({"config": args.config, "sets": args.sets, "canaries": args.canaries, "runs": results}, table, args.json)


if __name__ == "__main__":
    main()
