"""Per-rank batches of a global batch, read from the shards, prefetched in a background thread.

Every epoch has one seeded permutation of the split, identical on all ranks (seed + epoch); global step s takes
rows ``perm[s*B : (s+1)*B]`` and rank r reads its contiguous part ``[r*b : (r+1)*b]`` of that, b = B / world.
Incomplete last batches are dropped, so every rank takes the same number of steps and each sample is read at most
once per epoch by exactly one rank. The loader knows no MPI: it is handed (rank, world).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import numpy as np
import torch

from hpcai.data.shards import ShardedSplit


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchLoader:
    """Iterate ``(x, y)`` torch batches of this rank's share, for one epoch at a time.

    ``wait_s`` accumulates the time the consumer spent blocked on data (for the data-wait fraction).
    """

    def __init__(
        self, split: ShardedSplit, global_batch: int, rank: int, world: int, seed: int, prefetch: int = 2
    ):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not divide across {world} ranks")
        self.split, self.global_batch, self.rank, self.world = split, global_batch, rank, world
        self.local_batch = global_batch // world
        self.seed, self.prefetch = seed, prefetch
        self.wait_s = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.split) // self.global_batch

    def indices(self, epoch: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """Global row indices of this rank's batches in ``epoch``, from ``start_step``."""
        perm = epoch_permutation(len(self.split), self.seed, epoch)
        lo = self.rank * self.local_batch
        for step in range(start_step, self.steps_per_epoch):
            base = step * self.global_batch
            yield perm[base + lo : base + lo + self.local_batch]

    def _read(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.split.read(idx)
        return torch.from_numpy(x), torch.from_numpy(y)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of ``epoch``, from ``start_step`` (a resumed run starts mid-epoch)."""
        if self.prefetch == 0:
            for idx in self.indices(epoch, start_step):
                t0 = time.perf_counter()
                batch = self._read(idx)
                self.wait_s += time.perf_counter() - t0
                yield batch
            return
        yield from self._prefetched(epoch, start_step)

    def _prefetched(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # h5py releases the GIL while HDF5 reads, so a reader thread overlaps I/O with the training step.
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item: object) -> bool:
            while not stop.is_set():  # a bounded wait, so an abandoned epoch never strands this thread
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for idx in self.indices(epoch, start_step):
                    if not put(self._read(idx)):
                        return
                put(done)
            except BaseException as e:  # hand the error to the consumer, who raises it
                put(e)

        thread = threading.Thread(target=produce, name="hpcai-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_s += time.perf_counter() - t0
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)


def shard_range(n: int, rank: int, world: int) -> slice:
    """Contiguous near-equal part ``rank`` of ``n`` items (for evaluation, where every sample counts once)."""
    lo = n * rank // world
    hi = n * (rank + 1) // world
    return slice(lo, hi)
