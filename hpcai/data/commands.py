"""``hpcai data build`` and ``hpcai data info``: argument checks, the MPI relaunch, one-line errors.

    hpcai data build SOURCE --out DIR [--shards K] [-n N] [--overwrite] [--compression gzip|lzf|none]
                     [--checksum crc32c|fletcher32|none] [--label-column NAME] [--val-fraction F]
                     [--test-fraction F]
                     [--seed S]
    hpcai data info DIR [--json]

With ``-n N > 1`` outside MPI the build relaunches itself as ``mpiexec -n N python -m hpcai data build ...``
(like ``hpcai run``); under mpiexec/srun every rank runs in-process. Only rank 0 prints.

SIGTERM, SIGINT and SIGHUP stop a build promptly: the handler raises, the build removes its temporary
directory, and the command prints one line and exits 128 + the signal's number (143, 130, 129). A signal
ignored when the build started (``nohup``, a background job) stays ignored. Under MPI every rank leaves
with ``os._exit``: a rank that ends normally waits in MPI_Finalize for peers that may be inside a collective
(seen: a 2-rank build hung there after SIGTERM), while a rank that exits without finalizing makes mpiexec
end the others quietly. Rank 0 goes first (it cleans up and says why); the others wait for it a moment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcai.errors import UserError
from hpcai.fsio import temp_name

TMP_ENV = "HPCAI_DATA_TMP"  # the temporary directory's name, chosen by the launcher so it can clean up


def add_arguments(data_sub) -> None:
    build = data_sub.add_parser("build", help="build a sharded HDF5 dataset (on N ranks)")
    build.add_argument(
        "source",
        help="digits, synthetic-images[:k=v,..], synthetic-tokens[:k=v,..], FILE.npz, FILE.csv, FILE.txt, "
        "a dir of .npy files, or a dir of class subdirs",
    )
    build.add_argument(
        "--out", required=True, help="output directory (refused if it exists, unless --overwrite)"
    )
    build.add_argument("--shards", type=int, default=4, help="train shards (val/test get a quarter, >= 1)")
    build.add_argument("-n", "--ranks", type=int, default=1, help="MPI ranks writing shards in parallel")
    build.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    build.add_argument("--compression", choices=["none", "gzip", "lzf"], default="none")
    build.add_argument(
        "--checksum",
        choices=["crc32c", "fletcher32", "none"],
        default="crc32c",
        help="per-chunk checksum verified at read time: crc32c (ours, fast, each chunk once per process), "
        "fletcher32 (HDF5's filter, every read, slower), none",
    )
    build.add_argument("--label-column", default="label", help="CSV column holding the labels")
    build.add_argument("--val-fraction", type=float, default=0.0)
    build.add_argument("--test-fraction", type=float, default=0.2)
    build.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    info = data_sub.add_parser("info", help="print a dataset's manifest and verify its checksums")
    info.add_argument("dataset", help="dataset directory (holds manifest.json)")
    info.add_argument("--json", action="store_true", help="print the manifest and check results as JSON")


def _check(args: argparse.Namespace) -> None:
    if args.shards < 1:
        raise UserError(f"--shards: must be >= 1, got {args.shards}")
    if args.ranks < 1:
        raise UserError(f"-n: must be >= 1, got {args.ranks}")
    if not 0 < args.test_fraction < 1:
        raise UserError(f"--test-fraction: must be in (0, 1), got {args.test_fraction}")
    if not 0 <= args.val_fraction < 1 or args.val_fraction + args.test_fraction >= 1:
        raise UserError(f"--val-fraction: must be >= 0 with val + test < 1, got {args.val_fraction}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists; remove it, choose another --out, or pass --overwrite")


_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
PEER_GRACE_S = 2.0  # how long a rank other than 0 waits for rank 0 to clean up and end the job


@contextmanager
def _signals_stop_the_build() -> Iterator[list[int]]:
    """Make SIGTERM/SIGHUP raise SystemExit(128 + n) and SIGINT KeyboardInterrupt, so that the build's
    cleanup runs; the signals received are appended to the yielded list. Later signals are ignored: the
    cleanup they would interrupt is short."""
    got: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        if got:
            return
        got.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {}
    for name in _STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield got
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def build_command(args: argparse.Namespace) -> int:
    from hpcai.data.etl import build_dataset
    from hpcai.launch import mpi_environment, run_ranks

    _check(args)
    if args.ranks > 1 and not mpi_environment():
        out = Path(args.out)
        tmp = temp_name(out).name  # unique to this build; rank 0 creates it
        os.environ[TMP_ENV] = tmp
        try:
            code = run_ranks(args.ranks, ["-m", "hpcai", *_argv(args)])
        finally:
            shutil.rmtree(out.parent / tmp, ignore_errors=True)  # a rank killed hard cannot clean up: we do
        return code
    comm = None
    if mpi_environment():
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rank = comm.Get_rank() if comm is not None else 0
    with _signals_stop_the_build() as got:
        try:
            return _build(args, comm, rank, build_dataset)
        except (KeyboardInterrupt, SystemExit):
            if not got:
                raise
            if rank == 0:
                name = signal.Signals(got[0]).name
                sys.stderr.write(
                    f"hpcai: error: {args.out}: build stopped by {name} before it finished; "
                    "its temporary files were removed\n"
                )
            if comm is None or comm.Get_size() == 1:
                return 128 + got[0]
            _leave_mpi(rank, 128 + got[0])


def _leave_mpi(rank: int, code: int) -> None:
    """End this rank now, without MPI_Finalize (see the module docstring); never returns."""
    import time

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if rank != 0:
        time.sleep(PEER_GRACE_S)  # usually rank 0 has ended the job meanwhile, and this rank with it
    os._exit(code)


def _build(args: argparse.Namespace, comm, rank: int, build_dataset) -> int:
    try:
        build_dataset(
            args.source,
            args.out,
            args.shards,
            args.test_fraction,
            args.seed,
            log=lambda m: print(m, flush=True),
            val_fraction=args.val_fraction,
            compression=args.compression,
            checksum=args.checksum,
            label_column=args.label_column,
            overwrite=args.overwrite,
            comm=comm,
            tmp_name=os.environ.get(TMP_ENV),
            wait=False,  # two builds to one --out: the second is refused in one line (exit 2)
        )
    except Exception as e:
        if rank != 0:  # every rank got the same error (see etl._collective): rank 0 alone reports it
            return e.exit_code if isinstance(e, UserError) else 1
        raise
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "data",
        "build",
        args.source,
        "--out",
        args.out,
        "--shards",
        str(args.shards),
        "-n",
        str(args.ranks),
    ]
    argv += [
        "--compression",
        args.compression,
        "--checksum",
        args.checksum,
        "--label-column",
        args.label_column,
    ]
    argv += ["--val-fraction", repr(args.val_fraction), "--test-fraction", repr(args.test_fraction)]
    argv += ["--seed", str(args.seed)] + (["--overwrite"] if args.overwrite else [])
    return argv


def info_command(args: argparse.Namespace) -> int:
    from hpcai.data.shards import ShardedDataset

    ds = ShardedDataset(args.dataset)
    m = ds.manifest
    problems = ds.check_files()
    if args.json:
        print(json.dumps({"manifest": m, "checksums_ok": not problems, "problems": problems}, indent=2))
    else:
        print(
            f"{ds.root}: {m.get('source')} -> sample shape {tuple(m['sample_shape'])} {m.get('x_dtype')}, "
            f"labels {m.get('y_dtype', 'int64')}, {m['num_classes']} classes, compression "
            f"{m.get('compression', 'none')}, checksum {m.get('checksum', 'none')}"
        )
        norm = m.get("normalization", {})
        print(
            f"  normalisation (train): mean {norm.get('mean', float('nan')):.6g} "
            f"std {norm.get('std', float('nan')):.6g}"
        )
        for name, entry in m["splits"].items():
            print(f"  {name}: {entry['rows']} samples in {len(entry['shards'])} shards")
            for s in entry["shards"]:
                print(f"    {s['file']}: {s['rows']} samples, {s.get('bytes', 0) / 1e6:.1f} MB")
        print("  checksums: " + ("all shards match manifest.json" if not problems else "; ".join(problems)))
    if problems:
        raise UserError(problems[0])
    return 0
