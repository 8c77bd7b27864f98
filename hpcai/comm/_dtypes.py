"""How each supported element type travels over MPI and how two blocks of it are reduced.

MPI knows float32/float64/int32/int64 natively. It has no float16 or bfloat16 type, so those travel as their
raw 16-bit patterns (``MPI.INT16_T``: a plain copy, no arithmetic) and are reduced here with numpy or torch.
Those libraries widen each pair to float32, combine, and round once back to 16 bits (round-to-nearest-even).

Only this module and ``ring.py`` know about these details; nothing here allocates per call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

OPS: tuple[str, ...] = ("sum", "max", "min", "mean")
DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64", "int32", "int64")

# "mean" is a sum whose fully reduced blocks are then divided by the number of ranks (see ElementKind.finish).
_MPI_OPS = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "mean": MPI.SUM}
_NUMPY_UFUNCS = {"sum": np.add, "max": np.maximum, "min": np.minimum, "mean": np.add}
# Element type name -> MPI datatype used to move its bytes. float16/bfloat16 move as bit patterns.
_TRANSPORT = {
    "float16": MPI.INT16_T,
    "bfloat16": MPI.INT16_T,
    "float32": MPI.FLOAT,
    "float64": MPI.DOUBLE,
    "int32": MPI.INT32_T,
    "int64": MPI.INT64_T,
}

# reduce(acc, incoming): acc <- acc (op) incoming, in place
Reducer = Callable[[np.ndarray, np.ndarray], None]
# finish(block, ranks): applied once to each fully reduced block, in place ("mean" divides by ranks)
Finisher = Callable[[np.ndarray, int], None]


@dataclass(frozen=True)
class ElementKind:
    """Everything the all-reduce needs to know about one (element type, op) pair.

    name: element type name, one of DTYPES.
    itemsize: bytes per element.
    mpi_type: MPI datatype used for point-to-point transport of the raw bytes.
    mpi_op: the MPI reduction op for the small-message path (MPI_Allreduce).
    native: False for float16/bfloat16, whose small-message path reduces through a float32 copy because MPI
        cannot do arithmetic on them.
    reduce: in-place reducer on flat numpy views of the transport arrays.
    finish: None, or what is applied once to a fully reduced block before it is passed on ("mean": divide
        by the number of ranks). The rank that completes a block's reduction finishes it and everyone else
        copies the result, so the division costs 1/p of a pass per rank instead of a pass over the whole
        buffer afterwards, and all ranks still hold the same bits.
    """

    name: str
    itemsize: int
    mpi_type: MPI.Datatype
    mpi_op: MPI.Op
    native: bool
    reduce: Reducer
    finish: Finisher | None = None


def _bf16_reducer(op: str) -> Reducer:
    """bfloat16 blocks arrive as int16 numpy views; torch does the widen-combine-round arithmetic."""
    import torch  # only reached with a torch bfloat16 tensor, so torch is already imported

    fn = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum, "mean": torch.add}[op]

    def reduce(acc: np.ndarray, incoming: np.ndarray) -> None:
        a = torch.from_numpy(acc).view(torch.bfloat16)  # shares memory: no copy
        fn(a, torch.from_numpy(incoming).view(torch.bfloat16), out=a)

    return reduce


def _bf16_divide(block: np.ndarray, ranks: int) -> None:
    import torch

    t = torch.from_numpy(block).view(torch.bfloat16)
    t.div_(ranks)  # widen, divide, round once


def _numpy_divide(block: np.ndarray, ranks: int) -> None:
    np.divide(block, block.dtype.type(ranks), out=block)  # correctly rounded, like torch's div_


def _numpy_reducer(op: str) -> Reducer:
    ufunc = _NUMPY_UFUNCS[op]

    def reduce(acc: np.ndarray, incoming: np.ndarray) -> None:
        ufunc(acc, incoming, out=acc)

    return reduce


_KINDS: dict[tuple[str, str], ElementKind] = {}
# Looked up by dtype object, not by `dtype.name`: building that string costs ~2 us, as much as a small
# MPI_Allreduce. Non-native byte orders are different dtype objects, so they miss here.
_NUMPY_NAMES = {np.dtype(d): d for d in DTYPES if d != "bfloat16"}
_TORCH_NAMES: dict[Any, str] = {}


def element_kind(name: str, op: str) -> ElementKind:
    """Return the (cached) ElementKind for element type `name` and reduction `op`; ValueError on unknown
    op.
    """
    if op not in _MPI_OPS:
        raise ValueError(f"unknown reduction op {op!r}; valid ops: {', '.join(OPS)}")
    key = (name, op)
    kind = _KINDS.get(key)
    if kind is None:
        if op == "mean" and name.startswith("int"):
            raise TypeError(f"op 'mean' needs a floating-point dtype, got {name}")
        reducer = _bf16_reducer(op) if name == "bfloat16" else _numpy_reducer(op)
        finish = None
        if op == "mean":
            finish = _bf16_divide if name == "bfloat16" else _numpy_divide
        kind = ElementKind(
            name=name,
            itemsize=2 if name == "bfloat16" else np.dtype(name).itemsize,
            mpi_type=_TRANSPORT[name],
            mpi_op=_MPI_OPS[op],
            native=name not in ("float16", "bfloat16"),
            reduce=reducer,
            finish=finish,
        )
        _KINDS[key] = kind
    return kind


def as_flat_array(buf: Any) -> tuple[np.ndarray, str]:
    """Return a flat, writeable numpy view sharing memory with `buf`, and its element type name.

    bfloat16 tensors come back as an int16 view (numpy has no bfloat16). Raises TypeError for anything that is
    not a numpy array or a CPU torch tensor of a supported dtype, ValueError for non-contiguous or read-only
    input.
    """
    # Never import torch ourselves: a numpy-only caller should not pay for it.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(buf, torch.Tensor):
        if not _TORCH_NAMES:
            _TORCH_NAMES.update({getattr(torch, d): d for d in DTYPES})
        name = _TORCH_NAMES.get(buf.dtype)
        if name is None:
            raise TypeError(f"unsupported tensor dtype {buf.dtype}; supported: {', '.join(DTYPES)}")
        if not buf.is_cpu:
            raise TypeError(f"tensor is on {buf.device}; ring_allreduce works on CPU tensors only")
        if not buf.is_contiguous():
            raise ValueError(f"tensor of shape {tuple(buf.shape)} is not contiguous; pass .contiguous()")
        # Cheapest route to a flat numpy view (torch view(-1) alone costs ~1 us); detach so that .numpy()
        # also works on tensors that require grad.
        t = buf.detach() if buf.requires_grad else buf
        if name == "bfloat16":
            t = t.view(torch.int16)
        arr = t.numpy()
        arr = arr if arr.ndim == 1 else arr.reshape(-1)
        return arr, name
    if isinstance(buf, np.ndarray):
        name = _NUMPY_NAMES.get(buf.dtype)
        if name is None:
            numpy_dtypes = ", ".join(d for d in DTYPES if d != "bfloat16")
            raise TypeError(
                f"unsupported array dtype {buf.dtype.str} ({buf.dtype.name}); supported: {numpy_dtypes}"
                " in native byte order (bfloat16 only as a torch tensor)"
            )
        if not (buf.flags.c_contiguous or buf.flags.f_contiguous):
            raise ValueError(f"array of shape {buf.shape} is not contiguous; pass np.ascontiguousarray(...)")
        if not buf.flags.writeable:
            raise ValueError("array is read-only; ring_allreduce reduces in place")
        return (
            buf if buf.ndim == 1 else buf.reshape(-1, order="A")
        ), name  # contiguous: a view in memory order
    raise TypeError(f"expected a numpy array or a CPU torch tensor, got {type(buf).__name__}")
