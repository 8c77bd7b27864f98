"""In-place all-reduce: a segmented, pipelined ring for large messages, MPI_Allreduce for small ones.

    from hpcai.comm import ring_allreduce
    ring_allreduce(grads, comm)                       # numpy array or CPU torch tensor, reduced in place
    h = ring_allreduce_start(grads, comm); ...; h.wait()   # same, finished later

Check it against MPI_Allreduce:  mpiexec -n 4 python -m mpi4py tests/mpi_scripts/ring_check.py
Measure it:                      python -m hpcai.bench.allreduce -n 4 --sizes 4KiB,1MiB,64MiB

The ring (p ranks, buffer cut into p chunks, rank r talks only to left = r-1 and right = r+1):
  reduce-scatter, p-1 steps: receive a chunk from the left, reduce it into ours, pass the sum to the right;
      afterwards rank r holds the fully reduced chunk r+1.
  all-gather, p-1 steps: receive reduced chunks from the left straight into place and pass them on.
Each rank sends and receives 2(p-1)/p of the buffer, the bandwidth optimum. Every chunk is reduced exactly
once, in one fixed order, by a chain of ranks and then only copied, so all ranks end with bit-identical
results.

Chunks are cut into segments (SEGMENT_BYTES) so that the work streams: the receive of the next segment is
posted before the current one is reduced, and a segment is forwarded to the right as soon as it is reduced.
Seen from one rank, its outgoing chunks are its own chunk followed by exactly the chunks it receives, one step
later, so the whole all-reduce is one stream of 2(p-1) chunks in and 2(p-1) chunks out on a single tag (MPI
keeps messages between two ranks on one tag in order). Segments of reduce-scatter land in a few receive
buffers reused across calls; segments of the all-gather land in place.

Small messages (<= 512 KiB) go to MPI_Allreduce: 2(p-1) Python-level steps cost more than they save there.
From 4 ranks up the same holds up to 4 MiB: on a power-of-two number of ranks those go to our recursive
halving/doubling (halving.py, 2 log2(p) steps), on other counts to MPI_Allreduce (choose_algorithm).
MPICH's algorithms for it (recursive doubling, reduce-scatter + all-gather) combine the same operands in the
same tree on every rank, so its results are bit-identical across ranks too (true of MPICH in practice, not
promised by the MPI standard; tests/mpi_scripts/ring_check.py checks it).

Caveats: every rank must pass the same length, dtype and op (as with any MPI collective; not checked, since
checking would cost a collective). max/min on NaN follow numpy (NaN wins), not MPI. float16/bfloat16 sums
round to 16 bits at each of the p-1 ring steps (MPI_Allreduce on them, for small messages, goes through
float32 and rounds once). Ring traffic uses a private duplicate of `comm`, so it never matches the caller's
own messages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from mpi4py import MPI

from hpcai.comm._dtypes import ElementKind, as_flat_array, element_kind
from hpcai.comm._wait import Idle, wait_all, wait_request
from hpcai.comm.halving import halving_steps, is_power_of_two

# At or below this size: MPI_Allreduce. Measured on the 2-core dev box (float32, 2-3 ranks, MPICH 5.0.2): the
# ring took 1.3-2.2x MPI's time at 64-256 KiB, ~1.15x at 512 KiB, and was level or faster from 1 MiB up.
SMALL_MESSAGE_BYTES = 512 * 1024
# From 4 ranks up the ring's 2(p-1) Python-level steps cost more: measured on the 2-core box (quiet, 4 ranks,
# float32) the ring reached 0.64x MPI's busbw at 1 MiB and 0.88x at 4 MiB, 1.17x at 16 MiB; the reference
# host showed the same crossover (0.75-1.06x at 1-4 MiB, 4 ranks). Up to this size there, our recursive
# halving/doubling (halving.py: 2 log2(p) steps) on a power-of-two number of ranks, else MPI_Allreduce.
MID_MESSAGE_BYTES_4PLUS = 4 * 1024 * 1024


def choose_algorithm(nbytes: int, ranks: int) -> str:
    """What "auto" runs for a message of ``nbytes`` on ``ranks`` ranks: "mpi", "halving" or "ring"."""
    if nbytes <= SMALL_MESSAGE_BYTES:
        return "mpi"
    if ranks < 4 or nbytes > MID_MESSAGE_BYTES_4PLUS:
        return "ring"
    return "halving" if is_power_of_two(ranks) else "mpi"


SEGMENT_BYTES = 1 << 20  # pipeline segment; 512 KiB-2 MiB measured alike, 128-256 KiB slower at 16-64 MiB
_NUM_RECV_BUFFERS = 2  # receive buffers per in-flight all-reduce: one being reduced, one being filled
_ALGORITHMS = ("auto", "ring", "halving", "mpi")
_MEAN_FLOAT32 = element_kind("float32", "mean")  # 16-bit means on the MPI path divide in float32


# ----------------------------------------------------------------------------------------------------------
# Per-communicator state, kept as an MPI attribute of the caller's communicator: it lives and dies with it.


class _CommState:
    """A private duplicate of one communicator for ring traffic, plus pooled receive buffers."""

    def __init__(self, comm: MPI.Comm) -> None:
        # Collective: done in the first ring call on `comm`, which is itself collective.
        self.ring_comm = comm.Dup()
        self.sequence = 0  # counts ring all-reduces started; gives each one its own tag
        self.tag_limit = max(1, min(int(self.ring_comm.Get_attr(MPI.TAG_UB)), 1 << 20))
        # (numpy dtype, segment elements, buffers) -> free buffer sets; one in-flight all-reduce owns a set
        self.free_buffers: dict[tuple[np.dtype, int, int], list[list[np.ndarray]]] = {}

    def take_buffers(self, dtype: np.dtype, seg_elems: int, count: int) -> list[np.ndarray]:
        pool = self.free_buffers.setdefault((dtype, seg_elems, count), [])
        return pool.pop() if pool else [np.empty(seg_elems, dtype) for _ in range(count)]

    def give_back(self, dtype: np.dtype, seg_elems: int, bufs: list[np.ndarray]) -> None:
        self.free_buffers[(dtype, seg_elems, len(bufs))].append(bufs)


def _free_state(comm: MPI.Comm, keyval: int, state: _CommState) -> None:
    # Called by MPI_Comm_free on the caller's communicator (collective there, so it is collective here too).
    if not MPI.Is_finalized():
        state.ring_comm.Free()


_STATE_KEYVAL: int | None = None


def _comm_state(comm: MPI.Comm) -> _CommState:
    global _STATE_KEYVAL
    if _STATE_KEYVAL is None:
        _STATE_KEYVAL = MPI.Comm.Create_keyval(delete_fn=_free_state)
    state = comm.Get_attr(_STATE_KEYVAL)
    if state is None:
        state = _CommState(comm)
        comm.Set_attr(_STATE_KEYVAL, state)
    return state


# ----------------------------------------------------------------------------------------------------------
# The ring's schedule: pure arithmetic on (ranks, rank, length, segment length), cached.


Segments = tuple[tuple[int, int], ...]  # (offset, count) pairs
Messages = tuple[tuple[int, int, int, int], ...]  # (stream step, offset, count, ready)


@functools.lru_cache(maxsize=64)
def _schedule(p: int, r: int, n: int, seg: int) -> tuple[Segments, Messages]:
    """The message stream of rank r of p for n elements cut into segments of at most seg elements.

    Returns (own, incoming):
    own: (offset, count) segments of rank r's own chunk, sent to the right first (outgoing stream step 0).
    incoming: (stream step j, offset, count, ready) in arrival order; step j carries chunk (r-1-j) mod p.
        Steps j < p-1 are reduce-scatter (reduced into place); steps j >= p-1 are all-gather, received in
        place over a region this rank forwarded at outgoing step j+1-p. Such a receive may be posted once the
        incoming messages before index `ready` are processed (the forward issued) and that send completed.
    Chunk c is elements [c*n//p, (c+1)*n//p): sizes differ by at most one; every rank computes the same cuts.
    """

    def segments(c: int) -> list[tuple[int, int]]:
        lo, hi = c * n // p, (c + 1) * n // p
        return [(o, min(seg, hi - o)) for o in range(lo, hi, seg)]

    incoming: list[tuple[int, int, int, int]] = []
    step_end = [0] * (2 * (p - 1))  # index one past the last incoming message of each step
    for j in range(2 * (p - 1)):
        ready = 0 if j < p else step_end[j - p]  # outgoing step j+1-p is fed by incoming step j-p
        incoming += [(j, o, k, ready) for o, k in segments((r - 1 - j) % p)]
        step_end[j] = len(incoming)
    return tuple(segments(r)), tuple(incoming)


def _ring_steps(
    arr: np.ndarray, kind: ElementKind, comm: MPI.Comm, state: _CommState, seg_elems: int, idle: Idle | None
) -> Iterator[None]:
    """Run the ring all-reduce on flat `arr`; yield after each incoming segment so callers can interleave."""
    p, r = comm.Get_size(), comm.Get_rank()
    left, right = (r - 1) % p, (r + 1) % p
    tag = state.sequence % state.tag_limit
    state.sequence += 1
    rcomm, mtype, reduce, finish = state.ring_comm, kind.mpi_type, kind.reduce, kind.finish
    own, incoming = _schedule(p, r, arr.size, seg_elems)
    scratch = state.take_buffers(arr.dtype, seg_elems, _NUM_RECV_BUFFERS)
    nbuf = len(scratch)
    sends: list[list[MPI.Request]] = [[] for _ in range(2 * (p - 1))]  # by outgoing stream step
    recvs: list[MPI.Request | None] = [None] * len(incoming)

    def post(i: int) -> None:
        j, off, cnt, _ = incoming[i]
        if j < p - 1:
            target = scratch[i % nbuf][:cnt]
        else:
            wait_all(sends[j + 1 - p], idle)  # may not overwrite a region whose send is still in flight
            target = arr[off : off + cnt]
        recvs[i] = rcomm.Irecv([target, mtype], left, tag)

    try:
        sends[0] = [rcomm.Isend([arr[o : o + k], mtype], right, tag) for o, k in own]
        for i in range(min(nbuf - 1, len(incoming))):
            if incoming[i][3] <= 0:
                post(i)
        yield
        last = 2 * (p - 1) - 1
        for i, (j, off, cnt, _) in enumerate(incoming):
            # Post the next receive before reducing this segment. Its buffer slot was freed by segment i-1's
            # reduce; an in-place one waits until the segment it overwrites has been forwarded (only tiny
            # buffers, with empty chunks, ever defer here).
            k = i + nbuf - 1
            if k < len(incoming) and recvs[k] is None and incoming[k][3] <= i:
                post(k)
            if recvs[i] is None:
                post(i)
            wait_request(recvs[i], idle)
            recvs[i] = None
            if j < p - 1:
                reduce(arr[off : off + cnt], scratch[i % nbuf][:cnt])
                if j == p - 2 and finish is not None:  # fully reduced here: finish it while it is in cache
                    finish(arr[off : off + cnt], p)
            if j < last:  # what arrived at step j leaves at step j+1
                sends[j + 1].append(rcomm.Isend([arr[off : off + cnt], mtype], right, tag))
            yield
        for reqs in sends:
            wait_all(reqs, idle)
    except BaseException:
        # Leave no request writing into memory we are about to hand back; the collective is broken anyway.
        for req in recvs:
            if req:  # a live request (MPI.REQUEST_NULL is falsy)
                req.Cancel()
                req.Wait()
        raise
    else:
        state.give_back(arr.dtype, seg_elems, scratch)


def _halving(
    arr: np.ndarray, kind: ElementKind, comm: MPI.Comm, state: _CommState, idle: Idle | None
) -> Iterator[None]:
    """Recursive halving/doubling on the ring's private communicator, tag sequence and buffer pool."""
    tag = state.sequence % state.tag_limit
    state.sequence += 1
    half = (arr.size + 1) // 2
    (scratch,) = state.take_buffers(arr.dtype, half, 1)
    yield from halving_steps(arr, kind, state.ring_comm, tag, scratch, idle)
    state.give_back(arr.dtype, half, [scratch])


# ----------------------------------------------------------------------------------------------------------
# Public API


class AllreduceHandle:
    """An all-reduce in flight. `wait()` finishes it and returns the buffer; `step()` advances the ring by one
    segment.

    Handles on one communicator must be waited in the same order on every rank (the ring makes progress only
    inside `step()`/`wait()`), as for the order of blocking collectives.
    """

    def __init__(
        self,
        buf: Any,
        steps: Iterator[None] | None = None,
        request: MPI.Request | None = None,
        after: Callable[[], None] | None = None,
        idle: Idle | None = None,
    ) -> None:
        self._buf = buf
        self._steps = steps
        self._request = request
        self._after = after  # the MPI path's tail (_after_mpi), run once its request completes
        self._idle = idle
        self.done = steps is None and request is None

    def step(self) -> bool:
        """Advance by one segment (ring) or finish (MPI path); return True once the all-reduce is complete."""
        if self.done:
            return True
        if self._steps is not None:
            if next(self._steps, StopIteration) is not StopIteration:
                return False
            self._steps = None
        if self._request is not None:
            wait_request(self._request, self._idle)
            self._request = None
            if self._after is not None:
                self._after()
        self.done = True
        return True

    def wait(self) -> Any:
        """Block until complete; return the (reduced in place) buffer."""
        while not self.step():
            pass
        return self._buf


def _narrow_into(dest: np.ndarray, wide: np.ndarray) -> None:
    """Round float32 `wide` to 16 bits into `dest` (a float16 array, or an int16 view of bfloat16)."""
    if dest.dtype == np.float16:
        dest[...] = wide  # numpy rounds to nearest even
    else:
        import torch

        torch.from_numpy(dest).view(torch.bfloat16).copy_(torch.from_numpy(wide))  # round to nearest even


def _mpi_operand(kind: ElementKind, arr: np.ndarray, name: str) -> tuple[np.ndarray | None, list]:
    """What MPI reduces on the MPI path: ``arr`` itself, or, since MPI cannot add 16-bit floats, a float32
    copy ``wide`` that ``_after_mpi`` rounds back once (every rank rounds the same result)."""
    if kind.native:
        return None, [arr, kind.mpi_type]
    wide = _widen(arr, name)
    return wide, [wide, MPI.FLOAT]


def _after_mpi(kind: ElementKind, arr: np.ndarray, wide: np.ndarray | None, ranks: int) -> None:
    """The MPI path's tail once MPI has summed: "mean" divides (16-bit: the float32 copy, before it is
    rounded, so the result is rounded once), and a 16-bit result is rounded back into ``arr``."""
    if wide is None:
        if kind.finish is not None:
            kind.finish(arr, ranks)
        return
    if kind.finish is not None:
        _MEAN_FLOAT32.finish(wide, ranks)
    _narrow_into(arr, wide)


def _widen(arr: np.ndarray, name: str) -> np.ndarray:
    if name == "float16":
        return arr.astype(np.float32)
    import torch

    return torch.from_numpy(arr).view(torch.bfloat16).float().numpy()


def _prepare(
    buf: Any, comm: MPI.Comm, op: str, algorithm: str, segment_bytes: int
) -> tuple[np.ndarray, str, ElementKind, str]:
    """Validate the arguments; return (flat view, element type name, kind, path) with path "none", "ring" or
    "mpi".
    """
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; valid: {', '.join(_ALGORITHMS)}")
    if segment_bytes < 1:
        raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
    arr, name = as_flat_array(buf)
    kind = element_kind(name, op)
    if comm.Get_size() == 1 or arr.size == 0:
        return arr, name, kind, "none"
    if algorithm == "auto":
        algorithm = choose_algorithm(arr.nbytes, comm.Get_size())
    elif algorithm == "halving" and not is_power_of_two(comm.Get_size()):
        raise ValueError(f"algorithm 'halving' needs a power-of-two number of ranks, got {comm.Get_size()}")
    return arr, name, kind, algorithm


def ring_allreduce_start(
    buf: Any,
    comm: MPI.Comm = MPI.COMM_WORLD,
    op: str = "sum",
    *,
    algorithm: str = "auto",
    segment_bytes: int = SEGMENT_BYTES,
    idle: Idle | None = None,
) -> AllreduceHandle:
    """Start an in-place all-reduce of `buf` over `comm` (see `ring_allreduce`); finish it with `.wait()`.

    The MPI path starts MPI_Iallreduce at once; the ring path sends its own chunk and posts its first receive.
    """
    arr, name, kind, path = _prepare(buf, comm, op, algorithm, segment_bytes)
    if path == "none":
        return AllreduceHandle(buf)
    if path == "ring":
        seg_elems = max(1, segment_bytes // kind.itemsize)
        steps = _ring_steps(arr, kind, comm, _comm_state(comm), seg_elems, idle)
        next(steps)  # send our own chunk, post the first receive
        return AllreduceHandle(buf, steps=steps)
    if path == "halving":
        return AllreduceHandle(buf, steps=_halving(arr, kind, comm, _comm_state(comm), idle))
    wide, operand = _mpi_operand(kind, arr, name)
    req = comm.Iallreduce(MPI.IN_PLACE, operand, kind.mpi_op)
    after = functools.partial(_after_mpi, kind, arr, wide, comm.Get_size())
    return AllreduceHandle(buf, request=req, after=after, idle=idle)


def ring_allreduce(
    buf: Any,
    comm: MPI.Comm = MPI.COMM_WORLD,
    op: str = "sum",
    *,
    algorithm: str = "auto",
    segment_bytes: int = SEGMENT_BYTES,
    idle: Idle | None = None,
) -> Any:
    """Reduce `buf` in place across the ranks of `comm` and return it; the result equals MPI_Allreduce's.

    buf: contiguous numpy array or CPU torch tensor of float16, bfloat16 (torch only), float32, float64, int32
    or
        int64; any shape and length, the same on every rank.
    op: "sum", "max", "min" or "mean" (the sum divided by the number of ranks; floating-point dtypes only).
        The ring divides each chunk once, on the rank that completes its sum, before passing it on.
    algorithm: "auto" (choose_algorithm: MPI_Allreduce for small messages, recursive halving/doubling for
        mid-size ones on 4, 8, 16... ranks, the ring above), or "ring", "halving" (power-of-two ranks only)
        or "mpi" to force one.
    segment_bytes: pipeline segment size of the ring.
    idle: None to wait inside MPI (busy-polling), or a function called between MPI_Test polls while waiting
        for a peer, e.g. a short sleep, for a thread that shares its core with computation.
    All ranks end with bit-identical results. Raises TypeError for an unsupported type or dtype, ValueError
    for non-contiguous or read-only input or an unknown op/algorithm.
    """
    arr, name, kind, path = _prepare(buf, comm, op, algorithm, segment_bytes)
    if path == "mpi" and idle is None:
        # Blocking MPI_Allreduce, not Iallreduce + Wait: MPICH's blocking algorithms are the faster ones here.
        wide, operand = _mpi_operand(kind, arr, name)
        comm.Allreduce(MPI.IN_PLACE, operand, kind.mpi_op)
        _after_mpi(kind, arr, wide, comm.Get_size())
        return buf
    if path == "none":
        return buf
    return ring_allreduce_start(buf, comm, op, algorithm=path, segment_bytes=segment_bytes, idle=idle).wait()
