"""Synchronous data parallelism: identical replicas, gradients averaged with our ring all-reduce.

Rank 0's initial parameters and buffers are broadcast; gradients live in flat per-dtype buffers (``p.grad``
are views into them) cut into buckets that are all-reduced on a communication thread while backward still
runs (:mod:`hpcai.parallel.buckets`); all ranks then take the same optimizer step on the same bits, and
parameters stay bit-identical across ranks. A stall watchdog (:mod:`hpcai.comm.stall`) names the collective
and the ranks that have not arrived when one waits too long.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from hpcai.comm.stall import StallWatch, watched
from hpcai.parallel import dp_comm
from hpcai.parallel.buckets import GradBuckets
from hpcai.spec import CommSection
from hpcai.topology import Topology


class DataParallel:
    """The strategy object the training loop talks to; it never sees MPI."""

    def __init__(self, topo: Topology, grad_accum: int = 1, comm: CommSection | None = None):
        self.topo = topo
        self.grad_accum = grad_accum
        self.cfg = comm or CommSection()
        self.world_size = topo.dp_size
        self.rank = topo.rank
        self.is_root = topo.is_root
        self.buckets: GradBuckets | None = None
        self.watch = None
        self.step_s = 0.0

    def prepare(self, model: nn.Module) -> None:
        """Broadcast rank 0's state, lay gradients out in buckets, start the stall watchdog."""
        if self.world_size > 1 and self.cfg.stall_timeout_s > 0:
            self.watch = StallWatch(self.topo.dp_comm, self.cfg.stall_timeout_s, self.cfg.stall_abort)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                with self._watched("broadcast of initial state"):
                    dp_comm.broadcast_(t.data, self.topo.dp_comm)
        self.buckets = GradBuckets(
            model,
            self.world_size,
            self._allreduce_bucket,
            bucket_mb=self.cfg.bucket_mb,
            first_bucket_mb=self.cfg.first_bucket_mb,
            overlap=self.cfg.overlap,
            compression=self.cfg.compression,
        )

    def _watched(self, label: str):
        return watched(self.watch, label)

    def _allreduce_bucket(self, t: torch.Tensor, label: str, idle=None) -> None:
        with self._watched(label):
            dp_comm.allreduce_mean_(t, self.topo.dp_comm, idle)

    def train_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
        """Forward/backward of this rank's share in ``grad_accum`` micro-batches; one all-reduce.

        Gradients accumulate locally over the micro-batches (each loss weighted by its share of the batch, so
        the result is the gradient of the mean loss); buckets are communicated only during the last backward.
        """
        import time

        t0 = time.perf_counter()
        b = self.buckets
        b.zero_grad()
        if self.grad_accum == 1:
            loss = loss_fn(model(x), y)
            loss.backward()
        else:
            loss = torch.zeros(())
            chunks = list(zip(x.chunk(self.grad_accum), y.chunk(self.grad_accum), strict=True))
            for i, (xm, ym) in enumerate(chunks):
                b.sync = i == len(chunks) - 1
                part = loss_fn(model(xm), ym) * (len(xm) / len(x))
                part.backward()
                loss += part.detach()
            b.sync = True
        b.wait()  # only what is still in flight
        self.step_s += time.perf_counter() - t0
        return loss.detach()

    def zero_grad(self) -> None:
        """For callers that run backward themselves (a pipeline stage's replicas): hold communication until
        :meth:`reduce_gradients`, however many backward passes come in between."""
        self.buckets.zero_grad()
        self.buckets.sync = False

    def reduce_gradients(self) -> None:
        """Average the accumulated gradients over the replicas (every bucket, in order)."""
        self.buckets.sync = True
        self.buckets.wait()

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Sum a small array of metrics over the replicas."""
        values = np.ascontiguousarray(values)
        if self.world_size > 1:
            with self._watched("sum of metrics"):
                dp_comm.allreduce_sum_(values, self.topo.dp_comm)
        return values

    def max(self, values: np.ndarray) -> np.ndarray:
        """Element-wise maximum over the replicas (flags all ranks must agree on)."""
        values = np.ascontiguousarray(values)
        if self.world_size > 1:
            with self._watched("max of step flags"):
                dp_comm.allreduce_max_(values, self.topo.dp_comm)
        return values

    def gather(self, values: np.ndarray) -> np.ndarray | None:
        """Rank 0 gets a (world, *shape) array of every rank's equal-shaped ``values``; others get None."""
        with self._watched("gather to rank 0"):
            return dp_comm.gather_rows(np.ascontiguousarray(values), self.topo.dp_comm)

    def stats(self) -> dict:
        """Communication figures for summary.json."""
        b = self.buckets
        return {
            "buckets": len(b.buckets) if b else 0,
            "bucket_mb": self.cfg.bucket_mb,
            "comm_overlap": self.cfg.overlap,
            "comm_compression": self.cfg.compression,
            "exposed_comm_s": b.exposed_s if b else 0.0,
            "comm_s": b.comm_s if b else 0.0,
            "exposed_comm_fraction": (b.exposed_s / self.step_s) if b and self.step_s else 0.0,
            "stalls": list(self.watch.stalls) if self.watch else [],
        }

    def close(self) -> None:
        if self.buckets is not None:
            self.buckets.close()
        if self.watch is not None:
            self.watch.close()

    def params_digest(self, model: nn.Module) -> list[str] | None:
        """SHA-256 of this rank's parameters, gathered on rank 0 (to prove replicas stayed identical)."""
        h = hashlib.sha256()
        for p in model.state_dict().values():
            h.update(dp_comm.as_bytes(p.detach().cpu().contiguous()).tobytes())
        return dp_comm.gather_strings(h.hexdigest(), self.topo.dp_comm)
