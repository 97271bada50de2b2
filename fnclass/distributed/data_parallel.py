"""The data-parallel reduction as a gradient transform and a step wrapper (JAX's ``pmean`` inside a pmapped step).

Each process differentiates the mean loss of its shard of the global batch; :func:`data_parallel_gradient`
averages the gradients and losses with an all-reduce, so every process holds the global batch's mean gradient, and
:func:`with_global_metrics` counts the global batch's correct predictions. BatchNorm's statistics span the global
batch when the model was built with the process as its ``axis`` (``build_model(..., batch_norm_axis=process)``;
the all-reduces are differentiable), and the result equals one process stepping through the whole batch, up to
float rounding. Both wrap any other gradient or step: ``data_parallel_gradient(clipped_noisy_gradient(...))`` is
private training on P processes.
"""

from __future__ import annotations

from collections.abc import Callable

from fnclass.distributed import Process, all_mean, all_sum


def data_parallel_gradient(gradient: Callable, process: Process, *, average_state: bool = False) -> Callable:
    """``gradient`` (e.g. :func:`fnclass.training.step.mean_gradient`) averaged across the processes of a job.

    Args:
      gradient: the gradient to distribute, with :func:`fnclass.training.step.make_train_step`'s ``gradient``
        signature.
      process: a :class:`fnclass.distributed.Process`.
      average_state: also average the new model state (each shard's BatchNorm running statistics, when BatchNorm is
        not synchronised), so every process keeps one model.
    """
    def distributed(loss_and_aux: Callable, *, compile: bool = False) -> Callable:
        grad_and_value = gradient(loss_and_aux, compile=compile)

        def averaged(params, *args):
            grads, (loss, (new_state, logits)) = grad_and_value(params, *args)
            if average_state:
                new_state = all_mean(new_state, process)
            return all_mean(grads, process), (all_mean(loss, process), (new_state, logits))
        return averaged
    return distributed


def with_global_metrics(step: Callable, process: Process) -> Callable:
    """``step`` whose ``metrics["correct"]`` counts the global batch (the sum of the processes' shards)."""
    def counted(train_state, batch, key):
        new, metrics = step(train_state, batch, key)
        return new, {**metrics, "correct": all_sum(metrics["correct"], process)}
    return counted
