"""Check ring_allreduce against MPI_Allreduce on every rank; exit non-zero, naming each mismatch, if any
differ.

    mpiexec -n 4 python -m mpi4py tests/mpi_scripts/ring_check.py

(`-m mpi4py` turns an uncaught exception on one rank into MPI_Abort instead of a hang.) Covers lengths 0, 1,
fewer than ranks, odd, and over 1 MiB; every dtype; ops sum/max/min; numpy and torch inputs; COMM_WORLD,
COMM_SELF and a Dup(); forced ring with tiny segments (many pipeline steps on small buffers), forced recursive
halving on power-of-two rank counts (refused on others) and the automatic choice; several all-reduces in
flight at once. Results must match MPI_Allreduce (exactly for integers and max/min,
within a rounding bound for float sums) and be bit-identical across the ranks of the communicator.
"""

from __future__ import annotations

import sys
import zlib

import numpy as np
import torch
from mpi4py import MPI

from hpcai.comm import ring_allreduce
from hpcai.comm.ring import ring_allreduce_start

WORLD = MPI.COMM_WORLD
DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64")
OPS = ("sum", "max", "min", "mean")
# machine epsilon per dtype: the bound on a float sum's error is (ranks) * eps * sum of |operands|, twice over
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
failures: list[str] = []


def make(n: int, dtype: str, kind: str, seed: int, shape2d: bool = False) -> np.ndarray | torch.Tensor:
    """Random data of this rank: a numpy array or a torch tensor (bfloat16: torch only)."""
    rng = np.random.default_rng(seed)
    if dtype.startswith("int"):
        data = rng.integers(-1000, 1000, n).astype(dtype)
    else:
        data = rng.standard_normal(n).astype(np.float64 if dtype == "float64" else np.float32)
    if kind == "numpy":
        out = data.astype(dtype)
        return out.reshape(2, -1) if shape2d else out
    t = torch.from_numpy(data)
    t = t.to(getattr(torch, dtype))
    return t.reshape(2, -1) if shape2d else t


def as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float64 copy, flattened in logical (C) order. (torch's .double() of a float64 tensor would alias
    it.)
    """
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64, copy=True).numpy().reshape(-1)
    return x.astype(np.float64, copy=True).reshape(-1)


def raw_bytes(x: np.ndarray | torch.Tensor) -> bytes:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b""
    return x.tobytes(order="A")  # memory order: what was reduced


def check(
    comm: MPI.Comm,
    n: int,
    dtype: str,
    op: str,
    kind: str,
    label: str,
    fortran: bool = False,
    **ring_kwargs: object,
) -> None:
    """All-reduce one buffer with ring_allreduce; compare with MPI_Allreduce and across ranks; record
    failures.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    what = f"{label} n={n} {dtype} {op} {kind} {ring_kwargs or ''} on {p} ranks"
    seed = zlib.crc32(f"{what} {WORLD.Get_rank()}".encode())
    buf = make(n, dtype, kind, seed, shape2d=n == 300_008)
    if op == "mean" and dtype.startswith("int"):
        try:
            ring_allreduce(buf, comm, op, **ring_kwargs)
            failures.append(f"{what}: did not raise TypeError")
        except TypeError:
            pass
        return
    if fortran:
        buf = np.asfortranarray(buf.reshape(4, -1))
    orig64 = as_float64(buf)
    ptr = buf.data_ptr() if isinstance(buf, torch.Tensor) else buf.ctypes.data
    out = ring_allreduce(buf, comm, op, **ring_kwargs)
    if out is not buf or (buf.data_ptr() if isinstance(buf, torch.Tensor) else buf.ctypes.data) != ptr:
        failures.append(f"{what}: did not reduce in place and return its argument")
    # Reference: MPI_Allreduce on the original data; 16-bit floats reduced in float64 (MPI has no 16-bit
    # type).
    mpi_op = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "mean": MPI.SUM}[op]
    if dtype in ("float16", "bfloat16"):
        ref = orig64.copy()
        comm.Allreduce(MPI.IN_PLACE, ref, mpi_op)
        exact = op in ("max", "min")
        if exact:  # max/min pick an operand: exact in 16 bits too
            ref = as_float64(torch.from_numpy(ref).to(getattr(torch, dtype)))
    else:
        ref = orig64.astype(dtype)
        comm.Allreduce(MPI.IN_PLACE, ref, mpi_op)
        exact = op in ("max", "min") or dtype.startswith("int")
    scale = p if op == "mean" else 1  # the mean is the sum over p; the error bound scales with it
    if op == "mean":
        ref = ref / p
    got = as_float64(buf) if not dtype.startswith("int") else np.asarray(buf).reshape(-1)
    if exact:
        if not np.array_equal(got, ref):
            bad = int(np.flatnonzero(got != ref)[0])
            failures.append(f"{what}: element {bad} is {got[bad]}, MPI_Allreduce gives {ref[bad]}")
    else:
        abs_sum = np.abs(orig64)
        comm.Allreduce(MPI.IN_PLACE, abs_sum, MPI.SUM)
        err = np.abs(got - ref.astype(np.float64))
        bound = 2 * p * EPS[dtype] * abs_sum / scale + 1e-300
        if np.any(err > bound):
            bad = int(np.argmax(err / bound))
            msg = f"element {bad} is {got[bad]}, MPI gives {ref[bad]}, error > {bound[bad]:.3g}"
            failures.append(f"{what}: {msg}")
    everyone = comm.gather(raw_bytes(buf), root=0)  # pickled metadata-sized check, fine for a test
    if r == 0 and any(b != everyone[0] for b in everyone):
        failures.append(f"{what}: results differ between ranks (not bit-identical)")


def check_in_flight(comm: MPI.Comm) -> None:
    """Two ring all-reduces and one MPI-path all-reduce in flight at once on one communicator, waited in
    order.
    """
    p = comm.Get_size()
    a, b = np.full(300_001, 1.0, np.float32), np.arange(5000, dtype=np.int64)
    c = np.full(10, comm.Get_rank(), np.int32)
    d = np.random.default_rng(comm.Get_rank()).standard_normal(999).astype(np.float32)  # MPI_Iallreduce path
    ref = d.copy()
    comm.Allreduce(MPI.IN_PLACE, ref)
    ha = ring_allreduce_start(a, comm, algorithm="ring", segment_bytes=64 << 10)
    hb = ring_allreduce_start(b, comm, "max", algorithm="ring", segment_bytes=1000)
    hc = ring_allreduce_start(c, comm)
    hd = ring_allreduce_start(d, comm)
    e = np.full(70_001, 2, np.int64)
    he = ring_allreduce_start(e, comm, algorithm="halving" if p & (p - 1) == 0 else "ring")
    for h in (ha, hb, hc, hd, he):
        h.wait()
    ok = np.all(a == p) and np.array_equal(b, np.arange(5000)) and np.all(c == p * (p - 1) // 2)
    ok = ok and np.all(e == 2 * p)
    if not (ok and np.allclose(d, ref, rtol=1e-5, atol=1e-5)):
        failures.append(f"concurrent all-reduces on {p} ranks gave wrong results")
    everyone = comm.gather(d.tobytes(), root=0)
    if comm.Get_rank() == 0 and any(x != everyone[0] for x in everyone):
        failures.append(f"MPI_Iallreduce path on {p} ranks: results differ between ranks")


def main() -> int:
    p = WORLD.Get_size()
    dup = WORLD.Dup()
    for label, comm in (("world", WORLD), ("self", MPI.COMM_SELF), ("dup", dup)):
        q = comm.Get_size()
        halving = q & (q - 1) == 0  # recursive halving/doubling: power-of-two rank counts only
        small = sorted({0, 1, max(q - 1, 1), 7, 1001})
        for dtype in DTYPES:
            for kind in ("numpy", "torch") if dtype != "bfloat16" else ("torch",):
                for op in OPS:
                    for n in small:
                        check(comm, n, dtype, op, kind, label)  # auto: MPI_Allreduce path at these sizes
                        check(comm, n, dtype, op, kind, label, algorithm="ring", segment_bytes=24)
                        if halving:  # uneven halves, empty ones when n < ranks
                            check(comm, n, dtype, op, kind, label, algorithm="halving")
                # over 1 MiB: the ring path, with several segments per chunk
                check(comm, 300_008, dtype, "sum", kind, label, segment_bytes=64 << 10)
                check(comm, 300_008, dtype, "max", kind, label)
                if halving:
                    check(comm, 300_008, dtype, "sum", kind, label, algorithm="halving")
        check_in_flight(comm)
        if not halving:
            try:
                ring_allreduce(np.zeros(8, np.float32), comm, algorithm="halving")
                failures.append(f"algorithm='halving' on {q} ranks did not raise")
            except ValueError:
                pass
    # waits that poll MPI_Test and call idle() in between (the gradient thread during backward), every path
    for algorithm in ("mpi", "ring") + (("halving",) if p & (p - 1) == 0 else ()):
        for dtype in ("float32", "bfloat16"):
            kind = "torch" if dtype == "bfloat16" else "numpy"
            check(
                WORLD,
                70_001,
                dtype,
                "mean",
                kind,
                "world-idle",
                algorithm=algorithm,
                idle=lambda: None,
            )
    # default segments, several per chunk: (ranks + 1) MiB of float32
    check(WORLD, (p + 1) * (1 << 18) + 3, "float32", "sum", "numpy", "world-big")
    # 2 MiB + 12 bytes, automatic choice: recursive halving on 4 ranks, MPI_Allreduce on 5, the ring below 4
    check(WORLD, (1 << 19) + 3, "float32", "sum", "numpy", "world-mid")
    check(WORLD, 40_000, "float64", "sum", "numpy", "world-fortran", fortran=True)
    dup.Free()  # frees the ring's private communicator too (attribute delete callback)

    everyone = WORLD.gather(failures, root=0)
    if WORLD.Get_rank() == 0:
        flat = [f for fs in everyone for f in fs]
        for f in flat[:50]:
            print("MISMATCH", f, file=sys.stderr)
        if flat:
            print(f"ring_check: {len(flat)} failures on {p} ranks", file=sys.stderr)
            return 1
        print(f"ring_check: OK on {p} ranks")
    return 0


if __name__ == "__main__":
    rc = main()
    rc = WORLD.allreduce(rc, op=MPI.MAX)
    sys.exit(rc)
