"""Members spread over a torchrun job: each process trains a contiguous block of the K members whole.

A member is an independent run, so its steps need nothing from another process: no gradient is all-reduced between
members and no BatchNorm statistic is shared. The processes meet only where the run needs every member: the finite
check, the logged metrics and the checkpoints (mid-epoch and at epoch ends) and the evaluation, where every
process gathers the blocks of all the others (:meth:`MemberBlocks.gather`), so each holds the run's K members as
one process training all of them would.
"""

from __future__ import annotations

from typing import NamedTuple

import optree
import torch

from fnclass.distributed import Process, gather_rows, split_sizes
from fnclass.errors import InputError


class MemberBlocks(NamedTuple):
    """Which of a run's ``total`` members this process trains: all of them without a job (``process`` None)."""

    total: int
    process: Process | None

    @property
    def block(self) -> range:
        """This process's members: :func:`fnclass.distributed.split_sizes` block of its rank."""
        if self.process is None:
            return range(self.total)
        return split_sizes(self.total, self.process.world_size)[self.process.rank]

    def take(self, tree):
        """This process's block of a stacked tree (every leaf's leading member axis; copies, not views)."""
        if self.process is None:
            return tree
        block = self.block
        return optree.tree_map(lambda leaf: leaf[block.start:block.stop].clone(), tree)

    def gather(self, tree):
        """A stacked tree of every member from each process's block of it, on every process, bit for bit.

        Every leaf's rows are laid side by side as bytes, so one collective carries the whole tree whatever its
        dtypes; every process must call this at the same point of the run.
        """
        if self.process is None:
            return tree
        leaves, treedef = optree.tree_flatten(tree)
        count = len(self.block)
        rows = [_as_bytes(leaf, count) for leaf in leaves]
        everyone = gather_rows(torch.cat(rows, dim=1), self.total, self.process)
        gathered, start = [], 0
        for leaf, part in zip(leaves, rows):
            columns = everyone[:, start:start + part.shape[1]].contiguous().view(leaf.dtype)
            gathered.append(columns.reshape(self.total, *leaf.shape[1:]))
            start += part.shape[1]
        return optree.tree_unflatten(treedef, gathered)


def _as_bytes(leaf: torch.Tensor, count: int) -> torch.Tensor:
    """A leaf's ``count`` rows as bytes (copied into unit strides, which viewing as another dtype needs)."""
    rows = leaf.new_empty((count, leaf[0].numel()))
    return rows.copy_(leaf.reshape(rows.shape)).view(torch.uint8)


def member_blocks(total: int, process: Process | None) -> MemberBlocks:
    """The blocks of ``total`` members over the processes of a job (one block of all without one).

    Raises:
      InputError: when a process would train no member: the blocks hold ceil(K / P) members each, the last ones
        fewer, and a process without a member would only wait for the others.
    """
    if process is None:
        return MemberBlocks(total, None)
    sizes = [len(block) for block in split_sizes(total, process.world_size)]
    if 0 in sizes:
        fits = max(p for p in range(1, process.world_size + 1) if all(split_sizes(total, p)))
        raise InputError(f"{total} members (--seeds, --sweep) over {process.world_size} processes leave process "
                         f"{sizes.index(0)} without one (each process trains a block of up to {max(sizes)} whole "
                         f"members): run {fits} processes (torchrun --nproc-per-node {fits}), or train more members")
    return MemberBlocks(total, process)
