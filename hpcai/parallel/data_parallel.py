"""Synchronous data parallelism: identical replicas, gradients averaged with our ring all-reduce.

Rank 0's initial parameters and buffers are broadcast; every rank's gradients live in one flat buffer per
dtype (``p.grad`` are views into it), so averaging is one all-reduce per dtype with no packing copy; all ranks
then take the same optimizer step on the same bits, and parameters stay bit-identical across ranks.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from hpcai.parallel import dp_comm
from hpcai.topology import Topology


class DataParallel:
    """The strategy object the training loop talks to; it never sees MPI."""

    def __init__(self, topo: Topology, grad_accum: int = 1):
        self.topo = topo
        self.grad_accum = grad_accum
        self.world_size = topo.dp_size
        self.rank = topo.rank
        self.is_root = topo.is_root
        self._flat: list[torch.Tensor] = []

    def prepare(self, model: nn.Module) -> None:
        """Broadcast rank 0's state and point every parameter's grad into flat per-dtype buffers."""
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dp_comm.broadcast_(t.data, self.topo.dp_comm)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in model.parameters():
            if p.requires_grad:
                by_dtype.setdefault(p.dtype, []).append(p)
        self._flat = []
        for dtype, params in by_dtype.items():
            flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype)
            offset = 0
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            self._flat.append(flat)

    def zero_grad(self) -> None:
        for flat in self._flat:
            flat.zero_()

    def train_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
        """Forward/backward of this rank's share in ``grad_accum`` micro-batches; one all-reduce.

        Gradients accumulate locally over the micro-batches (each loss weighted by its share of the batch, so
        the result is the gradient of the mean loss) and are communicated once, after the last backward.
        """
        self.zero_grad()
        if self.grad_accum == 1:
            loss = loss_fn(model(x), y)
            loss.backward()
        else:
            loss = torch.zeros(())
            for xm, ym in zip(x.chunk(self.grad_accum), y.chunk(self.grad_accum), strict=True):
                part = loss_fn(model(xm), ym) * (len(xm) / len(x))
                part.backward()
                loss += part.detach()
        self.reduce_gradients()
        return loss.detach()

    def reduce_gradients(self) -> None:
        """Average gradients over the replicas (call after backward, before the optimizer step)."""
        if self.world_size == 1:
            return
        for flat in self._flat:
            dp_comm.allreduce_sum_(flat, self.topo.dp_comm)
            flat.div_(self.world_size)

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Sum a small array of metrics over the replicas."""
        values = np.ascontiguousarray(values)
        if self.world_size > 1:
            dp_comm.allreduce_sum_(values, self.topo.dp_comm)
        return values

    def max(self, values: np.ndarray) -> np.ndarray:
        """Element-wise maximum over the replicas (flags all ranks must agree on)."""
        values = np.ascontiguousarray(values)
        if self.world_size > 1:
            dp_comm.allreduce_max_(values, self.topo.dp_comm)
        return values

    def gather(self, values: np.ndarray) -> np.ndarray | None:
        """Rank 0 gets a (world, *shape) array of every rank's equal-shaped ``values``; others get None."""
        return dp_comm.gather_rows(np.ascontiguousarray(values), self.topo.dp_comm)

    def params_digest(self, model: nn.Module) -> list[str] | None:
        """SHA-256 of this rank's parameters, gathered on rank 0 (to prove replicas stayed identical)."""
        h = hashlib.sha256()
        for p in model.state_dict().values():
            h.update(dp_comm.as_bytes(p.detach().contiguous()).tobytes())
        return dp_comm.gather_strings(h.hexdigest(), self.topo.dp_comm)
