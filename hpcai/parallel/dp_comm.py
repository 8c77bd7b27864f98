"""The raw MPI calls of synchronous data parallelism: broadcast and all-reduce of flat tensors.

Buffer methods on contiguous tensors only (no pickling of data); the all-reduce is our own ring.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI

from hpcai.comm import ring_allreduce


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor's memory (0-dim tensors included)."""
    if not t.is_contiguous():
        raise ValueError("need a contiguous tensor")
    return t.reshape(-1).view(torch.uint8).numpy()


def broadcast_(t: torch.Tensor, comm: MPI.Comm, root: int = 0) -> None:
    """Overwrite ``t`` on every rank with root's values, bit for bit (raw bytes: exact for any dtype).

    A GPU tensor goes through host memory (our MPI is not CUDA-aware)."""
    if not t.numel():
        return
    if t.device.type != "cpu":
        host = t.detach().cpu()
        comm.Bcast([as_bytes(host), MPI.BYTE], root)
        t.copy_(host)
        return
    comm.Bcast([as_bytes(t), MPI.BYTE], root)


def allreduce_sum_(t: torch.Tensor | np.ndarray, comm: MPI.Comm) -> torch.Tensor | np.ndarray:
    """Sum ``t`` across the ranks of ``comm`` in place; every rank ends with identical bits."""
    return ring_allreduce(t, comm, op="sum")


def allreduce_mean_(
    t: torch.Tensor | np.ndarray, comm: MPI.Comm, idle: Callable[[], None] | None = None
) -> torch.Tensor | np.ndarray:
    """Average ``t`` across the ranks of ``comm`` in place (the ring divides as it reduces: no extra pass).

    ``idle``: called between polls while waiting for a peer (see ``hpcai.comm._wait``)."""
    return ring_allreduce(t, comm, op="mean", idle=idle)


def allreduce_max_(a: np.ndarray, comm: MPI.Comm) -> np.ndarray:
    return ring_allreduce(a, comm, op="max")


def gather_rows(a: np.ndarray, comm: MPI.Comm, root: int = 0) -> np.ndarray | None:
    """Gather equal-shaped arrays into a (size, *shape) array on ``root`` (buffer method, no pickling)."""
    out = np.empty((comm.Get_size(), *a.shape), dtype=a.dtype) if comm.Get_rank() == root else None
    if comm.Get_size() == 1:
        out[0] = a
        return out
    send = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
    recv = out.view(np.uint8).reshape(-1) if out is not None else None
    comm.Gather([send, MPI.BYTE], [recv, MPI.BYTE] if recv is not None else None, root=root)
    return out


def gather_strings(s: str, comm: MPI.Comm) -> list[str] | None:
    """Small metadata to rank 0 (pickled, lowercase method: fine for a few bytes)."""
    return comm.gather(s, root=0)
