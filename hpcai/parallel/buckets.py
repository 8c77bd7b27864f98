"""Gradient buckets all-reduced while backward still runs (the DDP / Horovod idea, on our ring).

Gradients live in one flat buffer per dtype, laid out in *reverse* parameter order — the order autograd
produces them — and cut, at module boundaries, into contiguous buckets: a small first bucket (it is ready
soonest), buckets of ``bucket_mb``, and a small last bucket (nothing is left to hide its all-reduce behind).
A hook on each parameter counts down its bucket; when a bucket's last gradient has been accumulated, the
bucket goes to a communication thread that averages it over the ranks in place (our ring's "mean": the
division rides on the reduction, no extra pass) while autograd computes the earlier layers' gradients.
``wait()`` blocks only for what is still in flight. Buckets are reduced in index order on every rank, whatever
order the hooks fire in, so all ranks call the collectives in the same sequence.

The communication thread is the only thread that calls MPI during backward (torch's autograd engine runs
without the GIL, numpy's adds and mpi4py's waits release it, so both make progress). While backward runs it
waits for peers by polling MPI_Test with a POLL_S sleep in between instead of blocking in MPI, which
busy-polls: with one core per rank a spinning wait takes the core from backward. Measured on this 2-core box
(2 ranks, 10.5M-parameter MLP, batch 64, `hpcai bench ddp`, 3 runs each): exposed communication 15.7-18.6%
-> 6.1-8.6% of the step (rank mean), 9.6-13.0% -> 3.2-4.0% for the slowest rank. Once backward ends it spins.

Optional compression sends float16/bfloat16 on the wire: the bucket is rounded into a 16-bit buffer allocated
once, reduced, and widened back into the float32 gradients.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

POLL_S = 50e-6  # sleep between polls while backward runs (a Linux sleep of this length takes ~60-100 us)
WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Bucket:
    index: int
    flat: torch.Tensor  # a contiguous slice of the per-dtype gradient buffer
    params: list[nn.Parameter]
    pending: int = 0
    wire: torch.Tensor | None = None  # 16-bit buffer for compressed transfer, allocated once
    host: torch.Tensor | None = None  # pinned host copy of a GPU bucket (MPI sees host memory only)
    ready: object | None = None  # a CUDA event: the bucket's gradients are computed
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def grad_units(model: nn.Module) -> list[list[nn.Parameter]]:
    """Trainable parameters grouped by the module that owns them, in reverse model order (autograd's).

    One module's parameters come out of one backward node together, so they belong in one bucket: cutting
    by parameter instead put layer k's bias into layer k+1's bucket, which then waited a whole layer longer.
    """
    seen: set[int] = set()
    units = []
    for module in reversed(list(model.modules())):
        unit = [p for p in reversed(list(module.parameters(recurse=False))) if p.requires_grad]
        unit = [p for p in unit if id(p) not in seen]  # a shared parameter is reduced once
        seen.update(id(p) for p in unit)
        if unit:
            units.append(unit)
    return units


def plan_buckets(
    units: list[list[nn.Parameter]], bucket_bytes: int, first_bucket_bytes: int
) -> list[list[nn.Parameter]]:
    """Group units (each one module's parameters, in the order autograd produces them) into buckets.

    The first bucket is small, because it is ready soonest. So is the last one: it holds the gradients
    autograd produces last (the layers nearest the input), which no backward computation is left to hide,
    so its all-reduce is the step's exposed communication (see ``hpcai bench ddp``).
    Between them, buckets of ~bucket_bytes. A unit larger than a bucket gets a bucket of its own; units are
    never split.
    """
    if not units:
        return []
    nbytes = [sum(p.numel() * p.element_size() for p in u) for u in units]
    tail = len(units) - 1  # units[tail:] form the last bucket: at least one unit, more while they fit
    tail_bytes = nbytes[-1]
    while tail > 0 and tail_bytes + nbytes[tail - 1] <= first_bucket_bytes:
        tail -= 1
        tail_bytes += nbytes[tail]
    groups: list[list[nn.Parameter]] = []
    current: list[nn.Parameter] = []
    size = 0
    cap = first_bucket_bytes
    for unit, unit_bytes in zip(units[:tail], nbytes[:tail], strict=True):
        if current and size + unit_bytes > cap:
            groups.append(current)
            current, size, cap = [], 0, bucket_bytes
        current += unit
        size += unit_bytes
    if current:
        groups.append(current)
    groups.append([p for u in units[tail:] for p in u])
    return groups


class GradBuckets:
    """Flat gradient buffers, their buckets, the hooks that launch them and the thread that reduces them.

    ``allreduce(flat_slice, label, idle)`` is the collective (average over the ranks, in place; ``idle`` is
    None or what to call between polls, see ``hpcai.comm._wait``); it runs on the communication thread.
    """

    def __init__(
        self,
        model: nn.Module,
        world_size: int,
        allreduce: Callable[[torch.Tensor, str], None],
        bucket_mb: float = 25.0,
        first_bucket_mb: float = 1.0,
        overlap: bool = True,
        compression: str = "none",
    ):
        self.world_size, self.allreduce, self.overlap = world_size, allreduce, overlap
        self.wire_dtype = WIRE_DTYPES[compression]
        units = grad_units(model)
        params = [p for u in units for p in u]
        by_dtype: dict[torch.dtype, list[list[nn.Parameter]]] = {}  # units split by dtype (one flat each)
        for unit in units:
            for dtype in dict.fromkeys(p.dtype for p in unit):
                by_dtype.setdefault(dtype, []).append([p for p in unit if p.dtype == dtype])
        self.flats: list[torch.Tensor] = []
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[int, Bucket] = {}
        device = params[0].device if params else torch.device("cpu")
        self.on_gpu = device.type == "cuda"
        for dtype, group in by_dtype.items():
            flat = torch.zeros(sum(p.numel() for u in group for p in u), dtype=dtype, device=device)
            self.flats.append(flat)
            offset = 0
            for members in plan_buckets(group, int(bucket_mb * 2**20), int(first_bucket_mb * 2**20)):
                start = offset
                for p in members:
                    p.grad = flat[offset : offset + p.numel()].view_as(p)  # autograd accumulates in place
                    offset += p.numel()
                wire = host = None
                if self.wire_dtype is not None and dtype == torch.float32:
                    wire = torch.empty(offset - start, dtype=self.wire_dtype, device=device)
                if self.on_gpu:
                    host = torch.empty(offset - start, dtype=(wire if wire is not None else flat).dtype)
                    host = host.pin_memory()
                bucket = Bucket(len(self.buckets), flat[start:offset], members, wire=wire, host=host)
                self.buckets.append(bucket)
                for p in members:
                    self._bucket_of[id(p)] = bucket
        self.sync = True  # False during the micro-batches of gradient accumulation that do not communicate
        self.computing = False  # True from zero_grad() to wait(): the training thread wants the core
        self.exposed_s = 0.0  # time the training thread waited for communication after backward
        self.comm_s = 0.0  # time the communication thread spent reducing
        self._cv = threading.Condition()
        self._ready: set[int] = set()
        self._next = 0  # next bucket index the thread reduces
        self._closed = False
        self._error: BaseException | None = None
        self._hooks = []
        if overlap and world_size > 1:
            for p in params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
            self._thread = threading.Thread(target=self._run, name="hpcai-grad-comm", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------------------- training thread

    def zero_grad(self) -> None:
        self.computing = True
        for flat in self.flats:
            flat.zero_()
        for b in self.buckets:
            b.pending = len(b.params)
            b.done.clear()
        with self._cv:
            self._ready.clear()
            self._next = 0

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.sync:
            return
        bucket = self._bucket_of[id(p)]
        bucket.pending -= 1
        if bucket.pending == 0:
            if self.on_gpu:  # the hook runs when the kernels are queued, not done: mark the point
                bucket.ready = torch.cuda.Event()
                bucket.ready.record()
            self._launch(bucket.index)

    def _launch(self, index: int) -> None:
        with self._cv:
            self._ready.add(index)
            self._cv.notify()

    def wait(self) -> None:
        """After the last backward: launch buckets whose hooks never fired (unused parameters), then wait."""
        self.computing = False  # from here on the comm thread may spin: nothing else wants the core
        if self.world_size == 1:
            return
        t0 = time.perf_counter()
        if not self.overlap:
            for b in self.buckets:
                self._reduce(b)
        else:
            for b in self.buckets:
                if b.pending > 0:  # a parameter that got no gradient this step: reduce its zeros anyway
                    b.pending = 0
                    b.ready = None
                    self._launch(b.index)
            if self.on_gpu:
                torch.cuda.synchronize()  # buckets launched above read gradients the stream may still write
            for b in self.buckets:
                while not b.done.wait(timeout=1.0):
                    self._raise_if_failed()
            self._raise_if_failed()
        self.exposed_s += time.perf_counter() - t0

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"gradient all-reduce failed: {self._error}") from self._error

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        if self.overlap and self.world_size > 1:
            with self._cv:
                self._closed = True
                self._cv.notify()
            self._thread.join(timeout=5)

    # ---------------------------------------------------------------------------- communication thread

    def _idle(self) -> None:
        if self.computing:
            time.sleep(POLL_S)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while self._next not in self._ready and not self._closed:
                        self._cv.wait()
                    if self._closed:
                        return
                    index = self._next
                    self._next += 1
                self._reduce(self.buckets[index])
        except BaseException as e:  # reported on the training thread by wait()
            self._error = e

    def _reduce(self, b: Bucket) -> None:
        t0 = time.perf_counter()
        label = f"all-reduce bucket {b.index}, {b.nbytes / 2**20:.1f} MB"
        idle = self._idle if self.overlap else None  # the comm thread yields the core while backward runs
        if b.ready is not None:
            b.ready.synchronize()
        elif self.on_gpu and not self.overlap:
            torch.cuda.synchronize()
        src = b.flat
        if b.wire is not None:
            b.wire.copy_(b.flat)  # round to 16 bits on the wire
            src = b.wire
        if b.host is not None:  # GPU: through pinned host memory, since our MPI is not CUDA-aware
            b.host.copy_(src)
            self.allreduce(b.host, label, idle)
            src.copy_(b.host)
            if src is not b.flat:
                b.flat.copy_(src)
            torch.cuda.current_stream().synchronize()
        elif b.wire is not None:
            self.allreduce(b.wire, label, idle)
            b.flat.copy_(b.wire)  # widen back; the optimizer works in float32
        else:
            self.allreduce(b.flat, label, idle)
        if self.on_gpu:
            torch.cuda.current_stream().synchronize()
        self.comm_s += time.perf_counter() - t0
        b.done.set()
