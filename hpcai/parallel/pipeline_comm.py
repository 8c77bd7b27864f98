"""The raw MPI calls of the pipeline: activations forward, gradients backward, metadata, gathers to rank 0.

Data moves with mpi4py's buffer methods on typed numpy arrays allocated once per run (one per micro-batch and
direction, so a non-blocking send's buffer is never overwritten while in flight, and a received activation
stays valid until its backward); the tensors the stage computes on are ``torch.from_numpy`` views of them.
Sends are ``Isend`` (the stage goes on computing; completed at the end of the step), receives are
``Irecv`` + ``Wait`` with the wait recorded as a ``recv`` span: that is the idle time the bubble is made of.
Only small metadata (shapes, names) uses the lowercase pickling calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from hpcai.comm.stall import WaitWatch
from hpcai.parallel.pipeline_trace import RECV, SEND, Timeline

TAG_FORWARD, TAG_BACKWARD, TAG_META, TAG_EVAL = 11, 12, 13, 14
_RECV_STALL = "waiting for {} of micro-batch {} from stage {} (rank {}), this run's step {}"
_SEND_STALL = "waiting for the neighbours (ranks {1}) to take this stage's sends of this run's step {0}"


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        raise TypeError(f"pipeline activations of dtype {dtype} cannot travel as numpy buffers") from None


class PipelineComm:
    """Point-to-point traffic of one stage with its neighbours on ``pp_comm`` (ranks ordered by stage)."""

    def __init__(self, pp_comm: MPI.Comm, timeline: Timeline, watch: WaitWatch | None = None):
        self.comm, self.tl, self.watch = pp_comm, timeline, watch
        self.stage, self.stages = pp_comm.Get_rank(), pp_comm.Get_size()
        self.prev = self.stage - 1 if self.stage > 0 else None
        self.next = self.stage + 1 if self.stage < self.stages - 1 else None
        # Stage -> world rank, for stall reports that name the rank a wait is stuck on.
        self.world_ranks = MPI.Group.Translate_ranks(
            pp_comm.Get_group(), list(range(self.stages)), MPI.COMM_WORLD.Get_group()
        )
        self.step = 0  # set by the caller: stall reports name the step
        self._pending: list[MPI.Request] = []
        self.recv_fwd: list[np.ndarray] = []  # activations in, per micro-batch (stages > 0)
        self.send_fwd: list[np.ndarray] = []  # activations out (stages < last)
        self.recv_bwd: list[np.ndarray] = []  # gradients of our output, from the next stage
        self.send_bwd: list[np.ndarray] = []  # gradients of our input, to the previous stage

    # ------------------------------------------------------------------------------- metadata
    def send_meta(self, meta: Any) -> None:
        self.comm.send(meta, dest=self.next, tag=TAG_META)

    def recv_meta(self) -> Any:
        return self.comm.recv(source=self.prev, tag=TAG_META)

    def allocate(
        self, n_micro: int, in_shape: tuple[int, ...], in_dtype, out_shape: tuple[int, ...], out_dtype
    ) -> None:
        """Buffers for ``n_micro`` micro-batches of ``(mb, *shape)`` (once per run, reused every step)."""
        in_np, out_np = numpy_dtype(in_dtype), numpy_dtype(out_dtype)
        has_prev, has_next = self.prev is not None, self.next is not None
        self.recv_fwd = [np.empty(in_shape, in_np) for _ in range(n_micro)] if has_prev else []
        self.send_bwd = [np.empty(in_shape, in_np) for _ in range(n_micro)] if has_prev else []
        self.send_fwd = [np.empty(out_shape, out_np) for _ in range(n_micro)] if has_next else []
        self.recv_bwd = [np.empty(out_shape, out_np) for _ in range(n_micro)] if has_next else []

    # ------------------------------------------------------------------------------- the four moves
    def _recv(self, buf: np.ndarray, source: int, tag: int, mb: int) -> torch.Tensor:
        with self.tl.span(RECV, mb):
            req = self.comm.Irecv(buf, source=source, tag=tag)
            if self.watch is None:
                req.Wait()
            else:
                what = "the activation" if tag == TAG_FORWARD else "the gradient"
                self.watch.begin(_RECV_STALL, what, mb, source, self.world_ranks[source], self.step)
                req.Wait()
                self.watch.end()
        return torch.from_numpy(buf)

    def _send(self, t: torch.Tensor, buf: np.ndarray, dest: int, tag: int, mb: int) -> None:
        with self.tl.span(SEND, mb):
            np.copyto(buf, t.detach().numpy())
            self._pending.append(self.comm.Isend(buf, dest=dest, tag=tag))

    def recv_forward(self, mb: int) -> torch.Tensor:
        return self._recv(self.recv_fwd[mb], self.prev, TAG_FORWARD, mb)

    def send_forward(self, t: torch.Tensor, mb: int) -> None:
        self._send(t, self.send_fwd[mb], self.next, TAG_FORWARD, mb)

    def recv_backward(self, mb: int) -> torch.Tensor:
        return self._recv(self.recv_bwd[mb], self.next, TAG_BACKWARD, mb)

    def send_backward(self, t: torch.Tensor, mb: int) -> None:
        self._send(t, self.send_bwd[mb], self.prev, TAG_BACKWARD, mb)

    def wait_sends(self) -> None:
        """Complete this step's sends (their buffers are reused next step)."""
        with self.tl.span(SEND):
            if self.watch is None:
                MPI.Request.Waitall(self._pending)
            else:
                peers = [r for r in (self.prev, self.next) if r is not None]
                ranks = ", ".join(str(self.world_ranks[r]) for r in peers)
                self.watch.begin(_SEND_STALL, self.step, ranks)
                MPI.Request.Waitall(self._pending)
                self.watch.end()
        self._pending = []

    # ------------------------------------------------------------------------------- evaluation
    def eval_send(self, t: torch.Tensor) -> None:
        """Blocking send of a no-grad activation (evaluation: sizes vary, no buffers kept)."""
        self.comm.Send(np.ascontiguousarray(t.numpy()), dest=self.next, tag=TAG_EVAL)

    def eval_recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = np.empty(shape, numpy_dtype(dtype))
        self.comm.Recv(buf, source=self.prev, tag=TAG_EVAL)
        return torch.from_numpy(buf)


# ----------------------------------------------------------------------------------- gathers to rank 0


def gather_arrays(
    arrays: dict[str, np.ndarray], extra: Any, comm: MPI.Comm, root: int = 0
) -> tuple[dict[str, np.ndarray], list[Any]] | None:
    """Every rank's named arrays and a small ``extra`` object, on ``root`` (None elsewhere).

    Per rank: its metadata (names, dtypes, shapes, ``extra``) pickled (small), then all of its bytes in one
    flat buffer with ``Send``/``Recv``: a stage's whole state in one message, whatever its dtypes.
    """
    names = list(arrays)
    flat = [np.ascontiguousarray(arrays[k]) for k in names]
    meta = ([(k, a.dtype.str, a.shape) for k, a in zip(names, flat, strict=True)], extra)
    me = comm.Get_rank()
    if me != root:
        comm.send(meta, dest=root, tag=TAG_META)
        payload = np.concatenate([a.view(np.uint8).reshape(-1) for a in flat] + [np.zeros(0, np.uint8)])
        comm.Send([payload, MPI.BYTE], dest=root, tag=TAG_META + 1)
        return None
    out: dict[str, np.ndarray] = dict(zip(names, flat, strict=True))
    extras = [None] * comm.Get_size()
    extras[root] = extra
    for src in range(comm.Get_size()):
        if src == root:
            continue
        entries, extras[src] = comm.recv(source=src, tag=TAG_META)
        sizes = [int(np.prod(shape)) * np.dtype(dt).itemsize for _, dt, shape in entries]
        buf = np.empty(sum(sizes), np.uint8)
        comm.Recv([buf, MPI.BYTE], source=src, tag=TAG_META + 1)
        offset = 0
        for (name, dt, shape), n in zip(entries, sizes, strict=True):
            out[name] = buf[offset : offset + n].view(np.dtype(dt)).reshape(shape)
            offset += n
    return out, extras


def gather_rows_varying(a: np.ndarray, comm: MPI.Comm, root: int = 0) -> list[np.ndarray] | None:
    """(n_r, k) float64 arrays of different n_r from every rank, on ``root`` (Gatherv: one buffer call)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    k = a.shape[1]
    counts = comm.gather(a.size, root=root)  # one int each: metadata
    if comm.Get_rank() != root:
        comm.Gatherv(a, None, root=root)
        return None
    out = np.empty(sum(counts), np.float64)
    comm.Gatherv(a, [out, counts], root=root)
    parts, offset = [], 0
    for c in counts:
        parts.append(out[offset : offset + c].reshape(-1, k))
        offset += c
    return parts
