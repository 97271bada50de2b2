#!/usr/bin/env bash
# The GPU checks in one run of under 9 minutes, from a bare copy of the repository (nothing installed):
# that fast.toml's compiled bf16 step traces as one graph, time to accuracy of configs/fast.toml over SEEDS seeds,
# train-step throughput (functional against stateful, eager and compiled), per-example gradients/s, K = 1 and 8
# members of fast.toml under vmap (compiled) against K runs one after another, and the private (DP-SGD) step (vmap
# at two chunk sizes and ghost clipping, against Opacus when its wheel is there), each under its own timeout, then a
# summary table.
#
#   bash benchmarks/gpu_check.sh                      # on a machine with one CUDA GPU; writes $OUT
#
# It needs CIFAR-10 in $FNCLASS_DATA (default .gpudata), either as the canonical arrays or as staged by
# `../shared/tools/stage-cifar10-for-device .gpudata` (decoded here), and optree: importable, or its wheel in
# benchmarks/wheels/, .whl/ or ../shared/wheels/; an opacus wheel there is installed too (optional: the
# per-example Opacus rows). Relative paths are taken from the repository root.
# Knobs (environment):
#   OUT                  where the log and the JSON files go (default benchmarks/out)
#   SEEDS                seeds of the time-to-accuracy run (default 3)
#   GPU_CHECK_DEVICE     cuda (default), or cpu for a dry run with small settings
#   GPU_CHECK_SETS       extra space-separated key=value config overrides for the time-to-accuracy run
#   GPU_CHECK_MODEL      model of the step and per-example benchmarks (default fast on cuda, tiny otherwise)
#   GPU_CHECK_PARTS      which parts to run (default "bf16_graph accuracy throughput per_example members dp";
#                        "" checks the set-up only)
#   GPU_CHECK_{BF16_GRAPH,ACCURACY,THROUGHPUT,PER_EXAMPLE,MEMBERS,DP}_S   each part's timeout in seconds (default
#                        45, 150, 90, 60, 150, 60: 555 in all; estimates, as no GPU has run them yet: compiling
#                        the members' steps of tiny took 2 min on the 2-core CPU)
# Dry run on a CPU: GPU_CHECK_DEVICE=cpu SEEDS=1 GPU_CHECK_SETS="model.name=tiny data.train_limit=2000
#   data.test_limit=500 train.epochs=1 train.compile=false" bash benchmarks/gpu_check.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/gpu_check.log") 2>&1
tee_pid=$!
# At exit, let tee write the last lines (bounded: a leftover child holding the pipe must not hang us).
trap 'exec >&- 2>&-; for _ in {1..50}; do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.1; done' EXIT
export PYTHONUNBUFFERED=1
# The repo root first: the opacus wheel also installs top-level `benchmarks` and `examples` packages.
export PYTHONPATH="$repo:/tmp/fnclass-site${PYTHONPATH:+:$PYTHONPATH}"

device="${GPU_CHECK_DEVICE:-cuda}"
seeds="${SEEDS:-3}"
parts="${GPU_CHECK_PARTS-bf16_graph accuracy throughput per_example members dp}"  # set but empty: environment and data only
read -r -a sets <<<"${GPU_CHECK_SETS:-}"
if [[ $device == cuda ]]; then
    model="${GPU_CHECK_MODEL:-fast}"
    # Compiling per-example gradients takes minutes (eval-mode BatchNorm has no vmap rule under
    # torch.compile, so the trace loops over the examples; benchmarks/RESULTS.md): eager only here.
    throughput_args=(--rounds 5)
    per_example_args=(--rounds 10 --no-compile)
    # fast.toml as `fnclass train --config fast --seeds 0-7` steps it: vmap, compiled, bf16 (no fresh processes for
    # peak memory: each would compile again)
    members_args=(--config fast --members 1 8 --strategies vmap --compile --steps 10 --rounds 5 --no-memory)
    dp_args=(--batch-size 1024 --rounds 5 --chunk-sizes 256 1024)
else
    model="${GPU_CHECK_MODEL:-tiny}"  # a dry run: every code path once, no meaningful figures
    throughput_args=(--batch-size 32 --rounds 2 --steps 1 --warmup 1)
    per_example_args=(--batch-size 8 --rounds 1 --chunk-sizes 8 --no-compile)
    members_args=(--config fast --set model.name=tiny --set train.batch_size=16 --set train.precision=fp32
                  --members 1 2 --strategies vmap --steps 1 --rounds 2 --no-memory)
    dp_args=(--batch-size 16 --rounds 1 --chunk-sizes 16)
fi

fail() {
    echo "gpu_check: $*" >&2
    exit 1
}

find_wheel() {  # NAME: the first NAME-*.whl in benchmarks/wheels/, .whl/ or ../shared/wheels/, or nothing
    local candidate
    for candidate in benchmarks/wheels/"$1"-*.whl .whl/"$1"-*.whl ../shared/wheels/"$1"-*.whl; do
        if [[ -f $candidate ]]; then
            echo "$candidate"
            return
        fi
    done
}
install_wheel() {  # WHEEL: into /tmp/fnclass-site, already on PYTHONPATH (there is no package index to ask)
    echo "installing $1 into /tmp/fnclass-site"
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/fnclass-site "$1"
}
importable() {  # MODULE: without importing it (opacus imports torch, which takes seconds)
    python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$1"
}
echo "== environment ($(date -u +%Y-%m-%dT%H:%M:%SZ), repo $repo, out $OUT)"
echo "fnclass at $(git describe --always --dirty 2>/dev/null || echo 'an unknown commit (no git metadata)')"
if ! python3 -c 'import optree' 2>/dev/null; then
    wheel=$(find_wheel optree)
    [[ -n $wheel ]] || fail "optree is not importable and no wheel was found: copy optree-*.whl (from
  ../shared/wheels) into .whl/ (and carry .whl to the device) or into benchmarks/wheels/"
    install_wheel "$wheel"
fi
# Optional: per_example_grads.py compares against Opacus only where it imports (its deps are on the GPU image).
if ! importable opacus; then
    wheel=$(find_wheel opacus)
    if [[ -n $wheel ]]; then
        install_wheel "$wheel"
    else
        echo "opacus: not importable and no opacus-*.whl: the per-example Opacus rows will be missing"
    fi
fi
rc=0
python3 - "$device" <<'EOF' || rc=$?
import platform, sys
import optree, torch
import fnclass
print(f"python {platform.python_version()} | torch {torch.__version__} | optree {optree.__version__} | fnclass from "
      f"{fnclass.__file__}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit(3)
    print(f"GPU {torch.cuda.get_device_name(0)} | CUDA {torch.version.cuda} | {torch.cuda.device_count()} device(s)")
EOF
[[ $rc != 3 ]] || fail "torch.cuda.is_available() is False: this check needs a CUDA GPU (GPU_CHECK_DEVICE=cpu: dry run)"
[[ $rc == 0 ]] || fail "python could not import torch, optree or fnclass (traceback above)"

DATA="${FNCLASS_DATA:-.gpudata}"
echo "== data: $DATA"
if [[ ! -f $DATA/train_images.npy ]]; then
    [[ -f $DATA/cifar10_from_jpeg.py ]] || fail "no $DATA/train_images.npy and no staged JPEGs in $DATA: on the
  machine that has ../shared, run \`../shared/tools/stage-cifar10-for-device .gpudata\` in the repository root
  (and carry .gpudata to the device), or point FNCLASS_DATA at a CIFAR-10 folder"
    # A different JPEG decoder can move a few pixels by a level: a checksum warning, not a failure.
    python3 "$DATA/cifar10_from_jpeg.py" "$DATA" "$DATA" || echo "warning: checksums differ; the data stays usable"
    [[ -f $DATA/train_images.npy ]] || fail "decoding the JPEGs in $DATA wrote no train_images.npy"
fi
FNCLASS_DATA=$(cd "$DATA" && pwd)
export FNCLASS_DATA

status=()
run_part() {  # NAME JSON TIMEOUT COMMAND...: run one part; a failure or a timeout is recorded, not fatal
    local name=$1 json=$2 limit=$3 start=$SECONDS rc=0
    shift 3
    if [[ " $parts " != *" $name "* ]]; then
        return
    fi
    rm -f "$json"  # a stale file must not pass for this run's result
    echo
    echo "== $name (timeout $limit s): $*"
    timeout --kill-after=15 "$limit" "$@" || rc=$?
    status+=("$name:$rc:$((SECONDS - start))")
    local outcome="exit $rc"
    [[ $rc != 124 && $rc != 137 ]] || outcome="timed out"
    echo "== $name: $outcome after $((SECONDS - start)) s"
}

json="$OUT/bf16_graph.json"
run_part bf16_graph "$json" "${GPU_CHECK_BF16_GRAPH_S:-45}" python3 - "$device" "$model" "$json" <<'EOF'
"""fast.toml's compiled step with bf16 autocast traces as one graph with no break: the variant tests/test_step.py
cannot trace, autocast being CUDA-only (on a CPU dry run it is a no-op, and the result says so)."""
import functools
import json
import sys
import time

import torch

import fnclass
from fnclass.core import losses, random, tree
from fnclass.training import recipe, step
from fnclass.config import load_config
from fnclass.models import resolve_config
from fnclass.models.fast import fit_whitening

device, model_name, out = sys.argv[1:]
start = time.perf_counter()
cfg = resolve_config(load_config("fast", [f"model.name={model_name}"]))
model = fnclass.build_model(cfg.model)
opt = recipe.create_optimizer(cfg.optim, model.param_labels, 25, cfg.train.epochs)
ts = tree.tree_to(step.create_train_state(model, opt, random.key(0)), device)
gen = torch.Generator().manual_seed(0)  # the graph depends on neither the values nor the batch size
images = torch.randn(64, 3, 32, 32, generator=gen).to(device)
labels = torch.randint(0, 10, (64,), generator=gen).to(device)
ts = ts._replace(state=fit_whitening(ts.state, images, cfg.model))
with step._autocast(device, cfg.train.precision):
    autocast_dtype = model.apply(ts.params, ts.state, images, train=False)[0].dtype
loss_fn = functools.partial(losses.cross_entropy, label_smoothing=cfg.train.label_smoothing)
compiled = step.make_train_step(model, loss_fn, opt, compile=True, precision=cfg.train.precision,
                                channels_last=cfg.train.channels_last)
explanation = torch._dynamo.explain(compiled._torchdynamo_orig_callable)(ts, (images, labels), random.key(1))
result = {"device": device, "model": model_name, "precision": cfg.train.precision,
          "autocast_dtype": str(autocast_dtype).removeprefix("torch."), "graphs": explanation.graph_count,
          "graph_breaks": explanation.graph_break_count,
          "break_reasons": [str(reason.reason) for reason in explanation.break_reasons],
          "seconds": round(time.perf_counter() - start, 1)}
print(json.dumps(result))
with open(out, "w") as handle:
    json.dump(result, handle, indent=2)
# On CUDA the forward must really run in bf16, or the trace would only have checked the float32 graph again.
bf16 = device != "cuda" or autocast_dtype == torch.bfloat16
sys.exit(0 if (result["graphs"], result["graph_breaks"]) == (1, 0) and bf16 else 1)
EOF
set_args=()
for item in "${sets[@]}"; do
    set_args+=(--set "$item")
done
json="$OUT/time_to_accuracy.json"
run_part accuracy "$json" "${GPU_CHECK_ACCURACY_S:-150}" python3 -m benchmarks.time_to_accuracy \
    --config fast --seeds "$seeds" --device "$device" --data-dir "$FNCLASS_DATA" --out "$json" \
    "${set_args[@]}"
json="$OUT/step_throughput.json"
run_part throughput "$json" "${GPU_CHECK_THROUGHPUT_S:-90}" python3 -m benchmarks.step_throughput \
    --device "$device" --model "$model" "${throughput_args[@]}" --json "$json"
json="$OUT/per_example_grads.json"
run_part per_example "$json" "${GPU_CHECK_PER_EXAMPLE_S:-60}" python3 -m benchmarks.per_example_grads \
    --device "$device" --model "$model" "${per_example_args[@]}" --json "$json"
json="$OUT/members.json"
run_part members "$json" "${GPU_CHECK_MEMBERS_S:-150}" python3 -m benchmarks.members --device "$device" \
    "${members_args[@]}" --json "$json"
json="$OUT/dp_step.json"
run_part dp "$json" "${GPU_CHECK_DP_S:-60}" python3 -m benchmarks.dp speed --device "$device" "${dp_args[@]}" \
    --json "$json"

echo
echo "== summary"
python3 - "$OUT" "${status[@]}" <<'EOF'
"""Read the parts' JSON files; print a compact table and write summary.json beside them."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
status = {name: {"exit": int(rc), "seconds": int(s)} for name, rc, s in (a.split(":") for a in sys.argv[2:])}


def read(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def accuracy(results):
    yield "device", results["device_name"]
    yield "seeds done", f"{len(results['seeds'])} of {results['seeds_asked']}"
    for column, stats in results["aggregate"].items():
        scale, unit = (100, "%") if "accuracy" in column else (1, " s")
        std = "" if stats["std"] is None else f" ± {scale * stats['std']:.2f}"
        yield column, f"{scale * stats['mean']:.2f}{std}{unit}"


def throughput(results):
    o = results["options"]
    yield "setting", f"{o['model']}, batch {o['batch_size']}, {o['precision']}, {results['device_name']}"
    for name, variant in results["variants"].items():
        yield f"{name} img/s", f"{variant['images_per_s']:.0f} (first call {variant['first_call_s']:.1f} s)"
    for mode, ratio in results["functional_over_stateful"].items():
        yield f"functional/stateful {mode}", f"{ratio:.3f}x"


def per_example(results):
    yield "setting", f"{results['options']['model']}, batch {results['options']['batch_size']}"
    for name, variant in results["variants"].items():
        yield f"{name} grads/s", f"{variant['grads_per_s']:.0f} ({results['over_naive_loop'][name]:.2f}x naive)"
    for m in results["chunk_memory"]:
        yield f"chunk {m['chunk_size']} peak MiB", f"{m['peak_bytes'] / 2**20:.0f}"


def dp(results):
    yield "setting", f"dp.toml's model, batch {results['batch_size']}, {results['device']}"
    for name, row in results["results"].items():
        ratio = "" if row["ratio_to_opacus"] is None else f" ({row['ratio_to_opacus'][1]:.2f}x opacus)"
        yield f"{name} examples/s", f"{row['examples_per_second']:.0f}{ratio}"


def members(results):
    yield "setting", (f"{results['model']}, batch {results['batch_size']}, {results['precision']}, compile "
                      f"{results['compile']}, {results['device_name']}")
    for row in results["rows"]:
        for name in results["strategies"]:
            ratio = row[f"sequential_over_{name}"]
            yield (f"K={row['members']} {name} img/s", f"{row['images_per_second'][name]:.0f} (sequential "
                   f"{row['images_per_second']['sequential']:.0f}; {ratio['median']:.2f}x [{ratio['min']:.2f}, "
                   f"{ratio['max']:.2f}], goal >= 3x at K=8)")


def bf16_graph(results):
    autocast = results["autocast_dtype"] if results["autocast_dtype"] == "bfloat16" else "none (a no-op off CUDA)"
    yield "setting", f"{results['model']}, {results['precision']} on {results['device']}, autocast {autocast}"
    yield "compiled step", f"{results['graphs']} graph(s), {results['graph_breaks']} break(s)"


parts = {"bf16_graph": ("bf16_graph.json", bf16_graph), "accuracy": ("time_to_accuracy.json", accuracy), "throughput": ("step_throughput.json", throughput),
         "per_example": ("per_example_grads.json", per_example), "members": ("members.json", members),
         "dp": ("dp_step.json", dp)}
rows, results = [], {}  # rows: (part, figure, value)
for part, s in status.items():
    outcome = "ok" if s["exit"] == 0 else "TIMED OUT" if s["exit"] in (124, 137) else f"FAILED (exit {s['exit']})"
    rows.append((part, "outcome", f"{outcome}, {s['seconds']} s"))
    name, figures = parts[part]
    results[part] = read(name)
    if results[part]:  # a timed-out accuracy part still has the seeds it finished
        rows += [(part, figure, value) for figure, value in figures(results[part])]

width = max((len(figure) for _, figure, _ in rows), default=0)
for part, figure, value in rows:
    print(f"{part:<12}{figure:<{width + 2}}{value}")
summary = {"status": status, "table": [list(row) for row in rows], "results": results}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out / 'summary.json'}")
EOF
