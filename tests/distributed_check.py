"""Run under torchrun by tests/test_distributed.py: a few data-parallel steps against one process's steps.

Every process steps through its shard of the same global batches of real CIFAR-10 images (the minimal step with
``data_parallel_gradient`` and ``with_global_metrics``: gradients averaged by all-reduce, and a model built with the
process as BatchNorm's axis: statistics over the global batch). Rank 0 also steps
through the whole batches alone, in float32 and in float64, and writes JSON with the distances: the data-parallel
run against the single float32 run, and that run against float64 (how far float32 rounding alone moves it). All
ranks' final states are gathered and compared bit for bit.
"""

import functools
import json
import sys

import torch

import fnclass
from fnclass import distributed
from fnclass.config import ModelConfig
from fnclass.core import losses, optim, tree
from fnclass.data import channel_stats, load_split, normalize
from fnclass.distributed.data_parallel import data_parallel_gradient, with_global_metrics
from fnclass.training.step import create_train_state, make_train_step, mean_gradient


def relative_distance(a, b) -> float:
    """The largest distance between two trees, relative to each leaf's scale."""
    fa, fb = tree.flatten_paths(a), tree.flatten_paths(b)
    return max(((fa[k].double() - fb[k].double()).abs().max() / fb[k].double().abs().max().clamp(min=1e-12)).item()
               for k in fb if fb[k].is_floating_point())


def parallel_step(model_config, opt, process, *, sync: bool = True, compile: bool = False):
    """The data-parallel step: synchronised BatchNorm (or each shard's statistics averaged), the gradient's and the
    metrics' reductions."""
    model = fnclass.build_model(model_config, batch_norm_axis=process if sync else None)
    # torch.func's gradient when the whole composition compiles (torch.compile traces it, not autograd.grad)
    gradient = data_parallel_gradient(functools.partial(mean_gradient, transformable=compile), process,
                                      average_state=not sync)
    step = with_global_metrics(make_train_step(model, losses.cross_entropy, opt, gradient=gradient), process)
    return torch.compile(step) if compile else step


def main(data_dir: str, out: str, steps: int = 4, batch: int = 128) -> None:
    process = distributed.from_environment("cpu")
    images, labels = load_split(data_dir, "train", limit=steps * batch)
    mean, std = channel_stats(images)
    x = normalize(images, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
    model_config = ModelConfig(name="tiny", widths=(8, 16, 16), stem_width=8)
    model = fnclass.build_model(model_config)
    opt = optim.sgd(0.05, momentum=0.9, nesterov=True)
    start = create_train_state(model, opt, fnclass.key(0))
    batches = [(x[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]) for i in range(steps)]
    parallel = parallel_step(model_config, opt, process)
    state, logged = start, []
    for i, (images_i, labels_i) in enumerate(batches):
        shard = (distributed.shard(process, images_i), distributed.shard(process, labels_i))
        state, metrics = parallel(state, shard, fnclass.fold_in(state.key, i))
        logged.append((float(metrics["loss"]), int(metrics["correct"])))
    # The compiled data-parallel step (torch.func's gradient through the differentiable all-reduces) is one graph
    # and takes the eager step's first update.
    compiled = parallel_step(model_config, opt, process, compile=True)
    first = (distributed.shard(process, batches[0][0]), distributed.shard(process, batches[0][1]))
    first_key = fnclass.fold_in(start.key, 0)
    explanation = torch._dynamo.explain(compiled._torchdynamo_orig_callable)(start, first, first_key)
    eager_one, _ = parallel(start, first, fnclass.fold_in(start.key, 0))
    compiled_one, _ = compiled(start, first, fnclass.fold_in(start.key, 0))
    # Without synchronised BatchNorm each shard has its own statistics: their average is kept, one model everywhere.
    unsynced = parallel_step(model_config, opt, process, sync=False)
    own, _ = unsynced(start, first, first_key)
    own_flat = torch.cat([leaf.reshape(-1).double() for leaf in tree.tree_leaves((own.params, own.state))])
    own_everyone = distributed.gather_rows(own_flat[None], process.world_size, process)
    flat = torch.cat([leaf.reshape(-1).double() for leaf in tree.tree_leaves((state.params, state.state,
                                                                                 state.opt_state))])
    everyone = distributed.gather_rows(flat[None], process.world_size, process)
    if process.rank == 0:
        single = make_train_step(model, losses.cross_entropy, opt)
        double = lambda t: tree.tree_map(lambda leaf: leaf.double() if leaf.is_floating_point() else leaf, t)
        f32, f64, single_logged = start, start._replace(params=double(start.params), state=double(start.state),
                                                        opt_state=double(start.opt_state)), []
        for i, (images_i, labels_i) in enumerate(batches):
            f32, metrics = single(f32, (images_i, labels_i), fnclass.fold_in(start.key, i))
            f64, _ = single(f64, (images_i.double(), labels_i), fnclass.fold_in(start.key, i))
            single_logged.append((float(metrics["loss"]), int(metrics["correct"])))
            if i == 0:  # one update: rounding not yet amplified by later steps
                f32_one, f64_one = f32, f64
        result = {"world_size": process.world_size,
                  "parallel_vs_single": relative_distance((state.params, state.state), (f32.params, f32.state)),
                  "single_vs_float64": relative_distance((f32.params, f32.state), (f64.params, f64.state)),
                  "parallel_vs_float64": relative_distance((state.params, state.state), (f64.params, f64.state)),
                  "first_single_vs_float64": relative_distance((f32_one.params, f32_one.state),
                                                               (f64_one.params, f64_one.state)),
                  "first_parallel_vs_float64": relative_distance((eager_one.params, eager_one.state),
                                                                 (f64_one.params, f64_one.state)),
                  "logged": logged, "single_logged": single_logged,
                  "ranks_identical": all(torch.equal(everyone[0], row) for row in everyone),
                  "unsynced_ranks_identical": all(torch.equal(own_everyone[0], row) for row in own_everyone),
                  "compiled_graphs": explanation.graph_count, "compiled_breaks": explanation.graph_break_count,
                  "compiled_vs_eager": relative_distance(compiled_one.params, eager_one.params)}
        with open(out, "w", encoding="utf-8") as handle:
            json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
