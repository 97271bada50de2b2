"""Sharding for data parallelism, as a batch source wrapper: every process draws the same global batch from the
same keys and keeps its own contiguous shard of the rows (the model key and the batch's counts stay global)."""

from __future__ import annotations

from fnclass.data.batches import Batch
from fnclass.distributed import Process, shard


class Sharded:
    """``source``'s batches, this process's shard of their images and labels."""

    def __init__(self, source, process: Process):
        self.source, self.process, self.varying = source, process, source.varying

    def __call__(self, step: int, epoch: int, epoch_step: int) -> Batch:
        batch = self.source(step, epoch, epoch_step)
        return batch._replace(images=shard(self.process, batch.images), labels=shard(self.process, batch.labels),
                              weights=None if batch.weights is None else shard(self.process, batch.weights))
