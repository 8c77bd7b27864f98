"""Per-rank batches of a global batch, read from the shards, transformed and prefetched by reader threads.

Every epoch has one seeded permutation of the split, identical on all ranks (seed + epoch); global step s
takes rows ``perm[s*B : (s+1)*B]`` and rank r reads its contiguous part ``[r*b : (r+1)*b]``, b = B / world.
So step s of an epoch is the same global batch whatever the rank count, and a resumed run restarts at
``epoch(e, start_step=s)``: the position in the epoch is just (e, s). The last incomplete global batch is
dropped (``drop_last=True``: every sample at most once per epoch, by exactly one rank) or padded with the
epoch's first rows (``drop_last=False``: every sample at least once). The loader knows no MPI: it is handed
(rank, world).

Speed: when the split fits ``cache_bytes`` it is read once, sequentially, into memory (each rank touches all
of it over a few epochs anyway, since the permutation is global); otherwise each batch is read by
:meth:`ShardedSplit.read`. ``readers`` threads read and transform batches ahead (``prefetch`` in flight):
numpy copies and ``preadv`` release the GIL, so reading overlaps the training step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from hpcai.data.shards import ShardedSplit
from hpcai.errors import DatasetError

# transform(x, epoch, step, offset, global_batch) -> x; offset: this rank's first position in the global batch
Transform = Callable[[np.ndarray, int, int, int, int], np.ndarray]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def check_batch_fits(split: ShardedSplit, global_batch: int, key: str = "train.batch_size") -> None:
    """Refuse a global batch larger than the split: not one full batch per epoch (DatasetError, exit 2).

    Every rank's share of a batch is then filled too, since ranks take equal parts of one global batch.
    """
    if global_batch > len(split):
        raise DatasetError(
            f"{key}: global batch {global_batch} is larger than the {split.split} split of {split.root} "
            f"({len(split)} samples): choose a batch of at most {len(split)}"
        )


class BatchLoader:
    """Iterate ``(x, y)`` torch batches of this rank's share, for one epoch at a time.

    ``wait_s`` accumulates the time the consumer spent blocked on data (for the data-wait fraction).
    """

    def __init__(
        self,
        split: ShardedSplit,
        global_batch: int,
        rank: int,
        world: int,
        seed: int,
        prefetch: int = 2,
        *,
        readers: int = 1,
        drop_last: bool = True,
        transform: Transform | None = None,
        cache_bytes: int = 1 << 30,
    ):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not divide across {world} ranks")
        if drop_last:  # padded batches (drop_last=False) are full whatever the split's size
            check_batch_fits(split, global_batch)
        self.split, self.global_batch, self.rank, self.world = split, global_batch, rank, world
        self.local_batch = global_batch // world
        self.seed, self.prefetch, self.readers = seed, prefetch, max(1, readers)
        self.drop_last, self.transform, self.cache_bytes = drop_last, transform, cache_bytes
        self.wait_s = 0.0

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.split)
        return n // self.global_batch if self.drop_last else -(-n // self.global_batch)

    def indices(self, epoch: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """Global row indices of this rank's batches in ``epoch``, from ``start_step``."""
        perm = epoch_permutation(len(self.split), self.seed, epoch)
        short = self.steps_per_epoch * self.global_batch - len(perm)
        if short > 0:  # pad the last global batch with the epoch's first rows (wrapping if the split is tiny)
            perm = np.concatenate([perm, np.resize(perm, short)])
        lo = self.rank * self.local_batch
        for step in range(start_step, self.steps_per_epoch):
            base = step * self.global_batch
            yield perm[base + lo : base + lo + self.local_batch]

    def _read(self, idx: np.ndarray, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.split.read(idx)
        if self.transform is not None:
            x = self.transform(x, epoch, step, self.rank * self.local_batch, self.global_batch)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of ``epoch``, from ``start_step`` (a resumed run starts mid-epoch)."""
        t0 = time.perf_counter()
        self.split.cache(self.cache_bytes)  # no-op once cached, or when the split is over budget
        self.wait_s += time.perf_counter() - t0
        steps = enumerate(self.indices(epoch, start_step), start=start_step)
        if self.prefetch == 0:
            for step, idx in steps:
                t0 = time.perf_counter()
                batch = self._read(idx, epoch, step)
                self.wait_s += time.perf_counter() - t0
                yield batch
            return
        yield from self._prefetched(epoch, steps)

    def _prefetched(self, epoch: int, steps: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A bounded window of futures, consumed in order: at most `prefetch` batches in memory ahead of the
        # step, read by `readers` threads. An abandoned epoch cancels what has not started.
        pool = ThreadPoolExecutor(max_workers=self.readers, thread_name_prefix="hpcai-reader")
        window: deque[Future] = deque()
        try:
            for step, idx in steps:
                window.append(pool.submit(self._read, idx, epoch, step))
                if len(window) <= self.prefetch:  # keep `prefetch` in flight while the step runs
                    continue
                yield self._take(window)
            while window:
                yield self._take(window)
        finally:
            for f in window:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _take(self, window: deque[Future]) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        batch = window.popleft().result()  # re-raises a reader's error (e.g. a corrupt shard) here
        self.wait_s += time.perf_counter() - t0
        return batch


def shard_range(n: int, rank: int, world: int) -> slice:
    """Contiguous near-equal part ``rank`` of ``n`` items (for evaluation, where every sample counts once)."""
    lo = n * rank // world
    hi = n * (rank + 1) // world
    return slice(lo, hi)
