"""`hpcai bench allreduce`: bus bandwidth of ring_allreduce vs MPI_Allreduce vs torch.distributed (gloo).

    hpcai bench allreduce -n 4 --sizes 4KiB,64KiB,1MiB,4MiB,16MiB,64MiB --json ar.json --plot ar.png
    python -m hpcai.bench.allreduce -n 2 --sizes 4KiB,64MiB --dtype float32 --iters 20
    mpiexec -n 4 python -m hpcai.bench.allreduce --sizes 1MiB    # already inside an MPI world: runs there

With -n N outside an MPI world it relaunches itself under `mpiexec -n N` (found by hpcai.launch: the mpiexec
beside this Python first, else PATH's) with OMP_NUM_THREADS=1. Each size is all-reduced in place (op sum) by:
  ring  `ring_allreduce` as users get it: algorithm "auto" (ring.choose_algorithm: MPI_Allreduce for small
        messages, marked "mpi path" in the table; recursive halving for 1-4 MiB on 4, 8, 16... ranks,
        marked "halving"; the ring above), unless --ring-algorithm says otherwise;
  mpi   `comm.Allreduce(MPI.IN_PLACE, ...)` of the same MPI library;
  gloo  `torch.distributed.all_reduce` on a gloo process group over loopback.
The three take turns inside every iteration; each iteration starts from the same data behind a barrier,
its time is the slowest rank's, and we report the median after warm-up. algbw = bytes / time,
busbw = algbw * 2(n-1)/n (the nccl-tests definitions), GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from hpcai.errors import UserError
from hpcai.launch import find_mpiexec, module_env, mpi_environment, mpiexec_command

PROG = "hpcai bench allreduce"
DEFAULT_SIZES = "4KiB,64KiB,1MiB,4MiB,16MiB,64MiB"
DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64")
_NO_MPI_BASELINE = ("float16", "bfloat16")  # MPI has no 16-bit float type: no "mpi" row for these
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30}
_UNITS["gib"] = 1 << 30


class UsageError(Exception):
    """A bad command line; reported as one line on stderr with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(message)  # argparse would print the usage too; we want one line and status 2


def parse_size(text: str) -> int:
    """'4KiB' -> 4096. Units B, K/KiB, M/MiB, G/GiB (powers of 1024, any case); a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot parse size {text!r}; use e.g. 4096, 4KiB, 64MiB, 1GiB")
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


def format_size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=None, help="ranks: relaunch under mpiexec -n N unless inside MPI")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated sizes (default {DEFAULT_SIZES})")
    ap.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)} (default float32)")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per size and implementation")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    ap.add_argument(
        "--ring-algorithm", default="auto", choices=("auto", "ring", "halving", "mpi"), help="ring's choice"
    )
    ap.add_argument(
        "--segment", default=None, help="ring pipeline segment size, e.g. 1MiB (default: module's)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the records here")
    ap.add_argument("--plot", type=Path, default=None, help="write busbw vs size here (PNG)")
    args = ap.parse_args(argv)
    if args.n is not None and args.n < 1:
        raise UsageError(f"-n must be at least 1, got {args.n}")
    if args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {args.dtype!r}; valid: {', '.join(DTYPES)}")
    if args.iters < 1 or args.warmup < 0:
        raise UsageError(f"need --iters >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if not args.sizes:
        raise UsageError("--sizes is empty")
    args.segment = parse_size(args.segment) if args.segment else None
    return args


# -----------------------------------------------------------------------------------------------------------
# The measurement, on every rank.


def _time_medians(fns: dict[str, Any], reset: Any, comm: Any, iters: int, warmup: int) -> dict[str, float]:
    """Median over iterations of the slowest rank's time for each fn(); reset() restores the input, untimed.

    The implementations take turns within each iteration, so load from elsewhere on the machine hits them
    alike, and the order of turns rotates, so none always runs right after the same other one.
    """
    import numpy as np
    from mpi4py import MPI

    times = np.empty((len(fns), iters))
    funcs = list(fns.values())
    for it in range(warmup + iters):
        for j in range(len(funcs)):
            k = (j + it) % len(funcs)
            fn = funcs[k]
            reset()
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if it >= warmup:
                times[k, it - warmup] = dt
    comm.Allreduce(MPI.IN_PLACE, times, MPI.MAX)  # per iteration, the slowest rank sets the time
    return {name: float(np.median(times[k])) for k, name in enumerate(fns)}


def _measure_size(args: argparse.Namespace, nbytes: int, comm: Any) -> list[dict[str, Any]]:
    """Time the three implementations on one message size; return one record per implementation."""
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    from hpcai.comm import ring

    n, rank = comm.Get_size(), comm.Get_rank()
    tdtype = getattr(torch, args.dtype)
    itemsize = torch.empty(0, dtype=tdtype).element_size()
    count = max(1, nbytes // itemsize)
    gen = torch.Generator().manual_seed(1234 + rank)
    if tdtype.is_floating_point:
        pristine = torch.randn(count, generator=gen).to(tdtype)
    else:
        pristine = torch.randint(-100, 100, (count,), generator=gen, dtype=tdtype)
    tensor = pristine.clone()
    # ring and mpi get the numpy view (what a numpy caller pays); gloo gets the tensor; all the same memory
    arr = tensor if args.dtype == "bfloat16" else tensor.numpy()
    ring_kwargs: dict[str, Any] = {"algorithm": args.ring_algorithm}
    if args.segment:
        ring_kwargs["segment_bytes"] = args.segment
    fns = {"ring": lambda: ring.ring_allreduce(arr, comm, **ring_kwargs)}
    if args.dtype not in _NO_MPI_BASELINE:
        fns["mpi"] = lambda: comm.Allreduce(MPI.IN_PLACE, arr, MPI.SUM)
    fns["gloo"] = lambda: dist.all_reduce(tensor)
    # gloo is timed on its own: its background threads outlive each call and, on a small machine, slowed
    # whichever implementation ran right after it (seen as MPI_Allreduce "losing" to itself by 2x).
    gloo = {"gloo": fns.pop("gloo")}
    medians = _time_medians(fns, lambda: tensor.copy_(pristine), comm, args.iters, args.warmup)
    medians |= _time_medians(gloo, lambda: tensor.copy_(pristine), comm, args.iters, args.warmup)
    records = []
    for impl, seconds in medians.items():
        algbw = count * itemsize / seconds / 1e9
        rec = {
            "impl": impl,
            "world_size": n,
            "bytes": count * itemsize,
            "dtype": args.dtype,
            "seconds": seconds,
            "algbw_GBps": algbw,
            "busbw_GBps": algbw * 2 * (n - 1) / n,
            "iters": args.iters,
        }
        if impl == "ring":  # which path ring_allreduce took
            algo = args.ring_algorithm
            auto = ring.choose_algorithm(count * itemsize, comm.Get_size())
            rec["algorithm"] = auto if algo == "auto" else algo
            rec["algorithm"] = "none" if n == 1 else rec["algorithm"]  # one rank: returns at once
            rec["segment_bytes"] = args.segment or ring.SEGMENT_BYTES
        records.append(rec)
    return records


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every size; return the records (the same list on every rank)."""
    import torch.distributed as dist
    from mpi4py import MPI

    from hpcai.bench.gloo import init_gloo

    comm = MPI.COMM_WORLD
    init_gloo(comm)
    try:
        return [rec for nbytes in args.sizes for rec in _measure_size(args, nbytes, comm)]
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------------------------------------
# Reporting, rank 0 only.


def _table_row(nbytes: int, row: dict[str, dict[str, Any]]) -> str:
    ring = row.get("ring")

    def busbw(impl: str) -> str:
        return f"{row[impl]['busbw_GBps']:.3f}" if impl in row else "-"

    def ratio(other: str) -> str:  # other's time over ring's = ring's busbw over other's
        return f"{row[other]['seconds'] / ring['seconds']:.2f}" if ring and other in row else "-"

    ring_us = f"{ring['seconds'] * 1e6:.1f}" if ring else "-"
    algo = ring.get("algorithm") if ring else None
    mark = f"  ({algo} path)" if algo in ("mpi", "halving") else ""
    cells = (
        format_size(nbytes),
        busbw("ring"),
        busbw("mpi"),
        busbw("gloo"),
        ring_us,
        ratio("mpi"),
        ratio("gloo"),
    )
    return "".join(f"{c:>11}" for c in cells) + mark


def format_table(records: list[dict[str, Any]]) -> str:
    """One row per size: busbw (GB/s) of each implementation, ring's time, ring's speed-up over the others.

    ring/mpi and ring/gloo: the other's time over ring's (= ring's busbw over the other's); > 1: ring faster.
    """
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for rec in records:
        by_size.setdefault(rec["bytes"], {})[rec["impl"]] = rec
    first = records[0] if records else {"world_size": "?", "dtype": "?"}
    head = ("size", "ring GB/s", "mpi GB/s", "gloo GB/s", "ring us", "ring/mpi", "ring/gloo")
    lines = [
        f"all-reduce busbw, {first['world_size']} ranks, {first['dtype']}",
        "".join(f"{h:>11}" for h in head),
    ]
    lines += [_table_row(nbytes, by_size[nbytes]) for nbytes in sorted(by_size)]
    return "\n".join(lines)


def write_plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in ("ring", "mpi", "gloo"):
        pts = sorted((r["bytes"], r["busbw_GBps"]) for r in records if r["impl"] == impl)
        if pts:
            ax.plot([b for b, _ in pts], [g for _, g in pts], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    first = records[0] if records else {"world_size": "?", "dtype": "?"}
    ax.set_title(f"all-reduce, {first['world_size']} ranks, {first['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print0(rank: int, text: str) -> None:
    """All terminal output goes through here: rank 0 only."""
    if rank == 0:
        print(text, flush=True)


def main(argv: list[str]) -> int:
    """Entry point of `hpcai bench allreduce`; returns the exit status."""
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.n is not None and args.n > 1 and not mpi_environment():
        try:
            cmd = mpiexec_command(args.n, ["-m", "hpcai.bench.allreduce", *argv], find_mpiexec())
        except UserError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return e.exit_code
        import subprocess

        # The ranks import this same hpcai and get what `hpcai run` gives its ranks (MPICH's single-copy
        # transfers where the kernel allows), so MPI_Allreduce and the ring are measured as jobs run them.
        return subprocess.run(cmd, env=module_env(args.n), check=False).returncode
    from mpi4py import MPI

    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    if args.n is not None and args.n != size:
        _print0(rank, f"{PROG}: note: -n {args.n} ignored; running on the {size} ranks of this MPI world")
    records = run(args)
    if rank == 0:
        _print0(rank, format_table(records))
        if args.json:
            args.json.write_text(json.dumps(records, indent=1) + "\n")
        if args.plot:
            write_plot(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
