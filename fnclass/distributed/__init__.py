"""Data parallelism on PyTorch's own engine: ``torchrun`` starts one process per device, ``torch.distributed``
(NCCL on GPUs, Gloo on CPUs) carries the collectives.

A data-parallel step is the single-process step with two additions, as JAX's ``pmean`` inside a pmapped step: the
gradient (and the step's metrics) averaged across processes with an all-reduce, and BatchNorm's batch statistics
computed over the whole global batch (the process given to the model as BatchNorm's ``axis``, Equinox's
``axis_name``; :mod:`fnclass.distributed.data_parallel`). The all-reduces are
``torch.distributed._functional_collectives``, the collectives ``torch.compile`` traces into the step's graph.
Every process derives the same batches from the run's key and cuts its own shard, so all hold the same TrainState.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any, NamedTuple

import optree
import torch

from fnclass.errors import InputError

_joined = False  # whether this process joined a job (see :func:`leave`)


class Process(NamedTuple):
    """This process's place in a data-parallel job (what torchrun's environment says)."""

    rank: int
    world_size: int
    local_rank: int
    group: Any  # the process group the collectives run over

    @property
    def writes(self) -> bool:
        """Whether this process writes files and prints: rank 0 only."""
        return self.rank == 0

    def all_sum(self, tree):
        """:func:`all_sum` over this job: what a layer given the process as its axis (BatchNorm) calls."""
        return all_sum(tree, self)


def from_environment(device: str = "auto") -> Process | None:
    """Join the job torchrun started (``WORLD_SIZE`` > 1 in the environment), or None for a single process.

    The backend is NCCL when the job runs on CUDA devices and Gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    import torch.distributed as dist

    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if on_gpu else "gloo")
        # Torn down before the interpreter exits: a process group left to the interpreter's shutdown can abort it
        # ("terminate called without an active exception", seen with Gloo), which torchrun reports as a failure.
        atexit.register(_shut_down)
        global _joined
        _joined = True
    return Process(dist.get_rank(), dist.get_world_size(), local_rank, dist.group.WORLD)


def _shut_down() -> None:
    """Destroy the process group (no barrier: a process that failed alone must not wait for the others)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> None:
    """Exit a process that joined a job with ``code``, without the interpreter's finalization.

    Destroying the process group does not join every Gloo worker thread: one still alive when the interpreter tears
    down can abort the process ("terminate called without an active exception", SIGABRT; seen in CI on rank 1
    after a completed ``fnclass grads``; 0 of 20 runs locally), and torchrun then reports a finished job
    as failed. By the time the CLI returns, every file is written (atomically) and the streams are flushed here, so
    the process leaves with its own exit code and skips the finalization (PyTorch's discussion:
    pytorch/pytorch#179291). A process that joined no job returns and exits normally.
    """
    if not _joined:
        return
    _shut_down()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


def finish(process: Process | None) -> None:
    """End a job that every process completed: wait for all (rank 0 writes the last files after the others are
    done), then tear the process group down, so no rank exits while another still talks to it."""
    if process is not None:
        import torch.distributed as dist

        dist.barrier(group=process.group)
        _shut_down()


def device_of(process: Process | None, device: torch.device) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` on GPUs."""
    if process is not None and device.type == "cuda":
        return torch.device("cuda", process.local_rank)
    return device


def first_on_rank_zero(process: Process, work) -> None:
    """Run ``work()`` on rank 0 while the others wait (a download into a shared cache), then let them go on."""
    import torch.distributed as dist

    if process.rank == 0:
        work()
    dist.barrier(group=process.group)


def check_batch(process: Process | None, batch_size: int) -> None:
    """Refuse a global batch the processes cannot share equally (one line naming the fix)."""
    if process is not None and batch_size % process.world_size:
        lower = batch_size - batch_size % process.world_size
        raise InputError(f"train.batch_size = {batch_size} does not divide among {process.world_size} processes: "
                         f"set it to a multiple of {process.world_size} (e.g. {lower or process.world_size})")


def broadcast(tensor: torch.Tensor, process: Process) -> torch.Tensor:
    """Rank 0's ``tensor`` on every process (a copy; ``tensor`` is left alone)."""
    import torch.distributed as dist

    copy = tensor.clone()
    dist.broadcast(copy, src=0, group=process.group)
    return copy


def shard(process: Process | None, batch: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of a global batch (the whole batch for a single process)."""
    if process is None:
        return batch
    size = len(batch) // process.world_size
    return batch[process.rank * size:(process.rank + 1) * size]


class _AllSum(torch.autograd.Function):
    """A sum across processes whose gradient is the sum of the processes' gradients (SyncBatchNorm's rule).

    Written with ``setup_context`` so that ``torch.func.grad`` (the compiled step's gradient) can differentiate
    it, which the functional collectives' own autograd cannot do (torch 2.14)."""

    @staticmethod
    def forward(tensor, group):
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", group))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _AllSum.apply(grad, ctx.group), None


def all_sum(tree, process: Process):
    """Every leaf summed across processes (differentiable, also under ``torch.func``; traced by torch.compile)."""
    return optree.tree_map(lambda leaf: _AllSum.apply(leaf, process.group), tree)


def all_mean(tree, process: Process):
    """Every leaf averaged across processes."""
    return optree.tree_map(lambda leaf: leaf / process.world_size, all_sum(tree, process))


def gather_rows(rows: torch.Tensor, total: int, process: Process | None) -> torch.Tensor:
    """The ``total`` rows that the processes' contiguous shards (:func:`split_rows`) hold, on every process."""
    if process is None:
        return rows
    import torch.distributed._functional_collectives as funcol

    per = -(-total // process.world_size)
    padded = torch.cat([rows, rows.new_zeros((per - len(rows), *rows.shape[1:]))]) if len(rows) < per else rows
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # the newer name, where it exists
    gathered = gather(padded.contiguous(), 0, process.group)
    gathered = gathered.wait() if hasattr(gathered, "wait") else gathered
    return torch.cat([gathered[r * per:r * per + len(part)] for r, part in
                      enumerate(split_sizes(total, process.world_size))])


def split_sizes(total: int, world_size: int) -> list[range]:
    """The row ranges of ``total`` rows cut into ``world_size`` contiguous shards of at most ceil(total / W)."""
    per = -(-total // world_size)
    return [range(min(r * per, total), min((r + 1) * per, total)) for r in range(world_size)]


def split_rows(rows: torch.Tensor, process: Process | None) -> torch.Tensor:
    """This process's contiguous shard of ``rows`` (an evaluation split): see :func:`gather_rows`."""
    if process is None:
        return rows
    part = split_sizes(len(rows), process.world_size)[process.rank]
    return rows[part.start:part.stop]
