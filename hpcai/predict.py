"""``hpcai predict``: distributed batch inference with a run's newest valid checkpoint, into ONE HDF5 file.

    hpcai predict runs/digits --data data/digits --out preds.h5                    # one process
    hpcai predict runs/digits --data data/digits --out preds.h5 -n 4 --logits --probabilities
    hpcai predict runs/digits --data data/digits --out preds.h5 --split train --overwrite
    mpiexec -n 4 hpcai predict runs/digits --data data/digits --out preds.h5      # already under MPI

The model is rebuilt from ``RUN_DIR/job.toml`` (its [model] section) for the dataset's sample shape and class
count. Rank 0 chooses the newest checkpoint in ``RUN_DIR/checkpoints`` that passes its checksums, reads it
once, and broadcasts the model's tensors: every rank scores with that one checkpoint, even while training
goes on committing newer ones and rotating the chosen one away. Rank r scores the contiguous rows
``[N*r/P, N*(r+1)/P)`` of the split, all ranks at once.

The output (readable with h5py or h5dump alone) holds, for all N rows of the split in row order:
``sample_ids`` (N,) the global row index in the split, ``predictions`` (N, *target) argmax over classes,
``labels`` (N, *target) the dataset's labels, and with ``--logits`` / ``--probabilities`` the float32
``logits`` / softmax ``probabilities`` (N, C, *target); attributes name the run, checkpoint, step, dataset,
split, ranks, accuracy and throughput.

Writing: HDF5 never writes to the disk itself. When a write fails under it (a full disk), HDF5 crashes on
close with a segmentation fault, so its metadata is built in memory (:class:`_Image`, h5py's file-object
driver) and written by us with plain ``os`` calls, whose failures are ordinary exceptions:

- before scoring, rank 0 lays the file out (every dataset contiguous, placed now, not filled), creates it
  under a temporary name unique to it (``O_EXCL | O_NOFOLLOW``), reserves its full size
  (``posix_fallocate``: a full disk is found here, before any work) and writes the metadata;
- each rank writes its rows' bytes at their offsets (``pwrite``), in rank order (a token passed rank to rank)
  so that no two writers share a file at once on file systems with weak coherence;
- rank 0 adds the attributes the same way, fsyncs and renames the file to ``--out``.

Every failure is agreed on by all ranks (one small allgather per phase) and reported once by rank 0: bad
input (no run, no valid checkpoint, a dataset whose samples do not fit the model, an unknown split, an
existing ``--out`` without ``--overwrite``, ``--out`` naming a directory) and a full disk are one line and
exit status 2; the temporary file is removed (on SIGTERM too) and an existing ``--out`` is left as it was.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcai.errors import UserError
from hpcai.fsio import NoSpaceError, create_exclusive, free_bytes, fsync_dir, is_no_space, temp_name

PROG = "hpcai predict"
METADATA_BYTES = 64 << 10  # room for HDF5's metadata and the attributes beyond the rows (~10 KB measured)
BCAST_CHUNK = 256 << 20  # bytes per MPI_Bcast of a tensor (far below the 2 GiB count limit)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (holds job.toml and checkpoints/)")
    p.add_argument("--data", required=True, help="dataset directory (holds manifest.json)")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("-n", "--ranks", type=int, default=1, help="MPI ranks scoring in parallel (default 1)")
    p.add_argument("--split", default="test", help="split to score: train, test or val (default test)")
    p.add_argument("--batch", type=int, default=512, help="rows per forward pass (default 512)")
    p.add_argument("--logits", action="store_true", help="also store the logits (N, C, ...) float32")
    p.add_argument("--probabilities", action="store_true", help="also store softmax probabilities")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line of the ranks when we relaunch under mpiexec."""
    argv = ["predict", args.run_dir, "--data", args.data, "--out", args.out, "-n", str(args.ranks)]
    argv += ["--split", args.split, "--batch", str(args.batch)]
    for flag in ("logits", "probabilities", "overwrite"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    return argv


@dataclass
class Prepared:
    """What every rank needs, checked: the model with its weights, the split, and where they came from."""

    model: Any
    split: Any
    dataset: Any
    checkpoint: Path | None = None  # rank 0 only until broadcast
    step: int = -1
    num_classes: int = 0
    layout: dict[str, tuple[tuple[int, ...], np.dtype]] = field(default_factory=dict)  # dataset: row, dtype
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # rank 0: the model's arrays, to broadcast
    weight_attrs: dict[str, Any] = field(default_factory=dict)


def _build(args: argparse.Namespace) -> Prepared:
    """The run's model (untrained) for the dataset, and the split; raises UserError (exit 2)."""
    from hpcai.data.shards import ShardedDataset
    from hpcai.models import build_model
    from hpcai.spec import load_spec, toml_string

    if args.ranks < 1 or args.batch < 1:
        raise UserError(f"-n and --batch must be >= 1, got {args.ranks} and {args.batch}")
    run_dir = Path(args.run_dir)
    job = run_dir / "job.toml"
    if not job.is_file():
        raise UserError(f"{run_dir}: not a run directory (job.toml missing)")
    # The run's own data.path may be gone or elsewhere: the model only needs --data's shapes.
    try:
        data_path = toml_string(str(args.data))
    except ValueError as e:
        raise UserError(f"--data: {e}") from None
    spec = load_spec(job, [f"data.path={data_path}", 'data.source=""'])
    data = ShardedDataset(args.data)
    if args.split not in data.splits:
        raise UserError(f"{args.data}: no split {args.split!r} (has {', '.join(data.splits)})")
    try:
        model = build_model(spec.model, data.sample_shape, data.num_classes)
    except UserError as e:  # a model that cannot take these samples
        raise UserError(
            f"{_where(args, data)} do not fit the model of {run_dir} ({spec.model.name}): {e}"
        ) from None
    return Prepared(model.eval(), data.splits[args.split], data, num_classes=data.num_classes)


def _where(args: argparse.Namespace, data: Any) -> str:
    return f"{args.data}: samples {data.sample_shape} with {data.num_classes} classes"


def prepare(args: argparse.Namespace) -> Prepared:
    """Every check of the input, in the order a user would fix them, and the checkpoint's choice: rank 0
    (and the launcher, to fail before any rank starts). Raises UserError (exit 2)."""
    import torch

    from hpcai import checkpoint as ckpt

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; --out names the output file (e.g. {out / 'preds.h5'})")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists; choose another --out or pass --overwrite")
    if not out.parent.is_dir():
        raise UserError(f"{out}: directory {out.parent} does not exist")
    p = _build(args)
    run_dir = Path(args.run_dir)
    skipped: list[str] = []
    found = ckpt.find_resumable(run_dir, warn=skipped.append)
    if found is None:  # say why the newest one was refused (a user may have only that one)
        why = f" (newest: {skipped[0].removeprefix('warning: skipping checkpoint: ')})" if skipped else ""
        raise UserError(f"{ckpt.checkpoint_dir(run_dir)}: no valid checkpoint to predict with{why}")
    p.checkpoint, payload = found
    p.step = payload.step
    where = _where(args, p.dataset)
    try:
        ckpt.unpack_model(payload, p.model)
    except UserError as e:  # tensors of other shapes
        raise UserError(f"{where} do not fit the model of {run_dir}: {e}") from None
    p.weights = {k: a for k, a in payload.arrays.items() if k.startswith("model/")}
    p.weight_attrs = dict(payload.attrs)
    target: tuple[int, ...] = ()
    label_dtype = np.dtype(np.int64)
    if len(p.split):
        x, y = p.split.read_range(0, 1)
        try:
            with torch.no_grad():
                logits = p.model(torch.from_numpy(x))
        except (RuntimeError, IndexError, TypeError) as e:  # e.g. float pixels into an embedding
            raise UserError(f"{where} do not fit the model of {run_dir}: {e}") from None
        target, label_dtype = tuple(y.shape[1:]), y.dtype
        if tuple(logits.shape) != (1, p.num_classes, *target):
            raise UserError(
                f"{where}: the model gives logits {tuple(logits.shape)[1:]} per sample, the labels need "
                f"({p.num_classes}, *{target})"
            )
    p.layout = {"sample_ids": ((), np.dtype(np.int64)), "predictions": (target, np.dtype(np.int64))}
    p.layout["labels"] = (target, label_dtype)
    for name in ("logits", "probabilities"):
        if getattr(args, name):
            p.layout[name] = ((p.num_classes, *target), np.dtype(np.float32))
    _check_space(out, len(p.split) * _row_bytes(p.layout) + METADATA_BYTES)
    return p


def _row_bytes(layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in layout.values())


def _check_space(out: Path, need: int) -> None:
    """Refuse an output the file system cannot hold (an estimate: the reservation in _create is exact)."""
    free = free_bytes(out.parent)
    if free is not None and free < need:
        raise NoSpaceError(f"{out}: no space left on device (the output needs {need:,} bytes, {free:,} free)")


def score(p: Prepared, lo: int, hi: int, batch: int, keep_logits: bool) -> dict[str, np.ndarray]:
    """Rows ``lo:hi`` of the split through the model: predictions, labels, and logits if asked."""
    import torch

    preds, labels, logits = [], [], []
    with torch.no_grad():
        for a in range(lo, hi, batch):
            x, y = p.split.read_range(a, min(hi, a + batch))
            z = p.model(torch.from_numpy(x))  # (b, C, *target)
            preds.append(z.argmax(1).numpy())
            labels.append(y)
            if keep_logits:
                logits.append(z.float().numpy())
    target = tuple(p.split.read_range(0, 1)[1].shape[1:]) if len(p.split) else ()
    out = {
        "sample_ids": np.arange(lo, hi, dtype=np.int64),
        "predictions": np.concatenate(preds) if preds else np.empty((0, *target), np.int64),
        "labels": np.concatenate(labels) if labels else np.empty((0, *target), np.int64),
    }
    if keep_logits:
        out["logits"] = (
            np.concatenate(logits) if logits else np.empty((0, p.num_classes, *target), np.float32)
        )
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------ the output file


class _Image:
    """A file object for h5py's file-object driver: reads come from ``fd`` (None: an empty file) overlaid
    with what HDF5 wrote, and writes stay in memory until :meth:`commit`. HDF5 writes only metadata here
    (datasets are placed, not filled), so the memory is a few KB."""

    def __init__(self, fd: int | None):
        self.fd, self.pos, self.writes = fd, 0, []
        self.size = os.fstat(fd).st_size if fd is not None else 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (0, self.pos, self.size)[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = max(0, self.size - self.pos if n < 0 else min(n, self.size - self.pos))
        buf = bytearray(os.pread(self.fd, n, self.pos) if self.fd is not None else b"")
        buf += bytes(n - len(buf))
        for at, data in self.writes:  # later writes over earlier ones, as on disk
            lo, hi = max(at, self.pos), min(at + len(data), self.pos + n)
            if lo < hi:
                buf[lo - self.pos : hi - self.pos] = data[lo - at : hi - at]
        self.pos += n
        return bytes(buf)

    def write(self, data: bytes) -> int:
        self.writes.append((self.pos, bytes(data)))
        self.pos += len(data)
        self.size = max(self.size, self.pos)
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        self.size = self.pos if size is None else size
        return self.size

    def flush(self) -> None:
        pass

    def commit(self, fd: int) -> None:
        """Write it all to ``fd``: reserve the file's full size first, so a full disk fails here, cleanly."""
        try:
            os.posix_fallocate(fd, 0, self.size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise  # ENOSPC, EDQUOT; a file system that cannot reserve finds out in the writes below
        for at, data in self.writes:
            _pwrite_all(fd, memoryview(data), at)
        if os.fstat(fd).st_size != self.size:
            os.ftruncate(fd, self.size)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _create(
    out: Path, tmp: Path, n: int, layout: dict[str, tuple[tuple[int, ...], np.dtype]]
) -> dict[str, Any]:
    """Rank 0: the output file, under the temporary name ``tmp``, with every dataset at full size (N rows)
    and its space reserved. Returns each dataset's byte offset (None: no rows), stored dtype and row shape."""
    import h5py

    image = _Image(None)
    placed: dict[str, Any] = {}
    with h5py.File(image, "w") as f:
        for name, (shape, dtype) in layout.items():
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # placed now, at an offset we can write to
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # and not filled: the ranks write every byte
            space = h5py.h5s.create_simple((n, *shape))
            ds = h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(dtype), space, dcpl=dcpl)
            placed[name] = (ds.get_offset(), ds.dtype.str, shape)
    try:
        fd = create_exclusive(tmp)
    except OSError as e:
        if is_no_space(e):
            raise
        raise UserError(f"{out}: cannot create the output in {out.parent}: {e.strerror}") from None
    try:
        image.commit(fd)
    except BaseException:
        os.unlink(tmp)  # ours: created above
        raise
    finally:
        os.close(fd)
    return placed


def _write_rows(tmp: Path, lo: int, part: dict[str, np.ndarray], placed: dict[str, Any]) -> None:
    """This rank's rows ``lo:lo+len`` of every dataset, as bytes at their offsets."""
    if "probabilities" in placed:
        part = {**part, "probabilities": _softmax(part["logits"])}
    fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for name, (offset, stored, shape) in placed.items():
            a = np.ascontiguousarray(part[name], dtype=np.dtype(stored))  # the file's byte order
            if offset is not None and a.size:
                row = int(np.prod(shape, dtype=np.int64)) * a.itemsize
                _pwrite_all(fd, memoryview(a.reshape(-1).view(np.uint8)), offset + lo * row)
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish(tmp: Path, out: Path, attrs: dict[str, Any]) -> None:
    """Rank 0: the attributes (through an _Image too), then on disk, then under the final name."""
    import h5py

    fd = os.open(tmp, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        image = _Image(fd)
        with h5py.File(image, "r+") as f:
            for key, value in attrs.items():
                f.attrs[key] = value
        image.commit(fd)
        os.fsync(fd)  # on disk before the name says it is complete
    finally:
        os.close(fd)
    os.replace(tmp, out)
    fsync_dir(out.parent)


def _remove_on_sigterm(tmp: Path) -> Callable[[], None]:
    """Until the returned function is called, SIGTERM (scancel, Slurm's time limit) first removes ``tmp``,
    then ends the process as it would have (same status). A handler runs between Python steps only: a rank
    blocked in an MPI call when the launcher kills it may still leave ``tmp``, named as a temporary."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        try:
            tmp.unlink()
        except OSError:
            pass
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------ the ranks


class _RankFailure(UserError):
    """A rank failed in a way that is not the input's fault: one line, exit status 1."""

    exit_code = 1


def _agree(comm: Any, error: BaseException | None, out: Path) -> None:
    """Collective (every rank calls it in the same phase): raise the first failure of any rank, in rank
    order, on every rank, so that all stop together and rank 0 reports it once. A full disk is named by
    the output file (exit 2); any other error is one line naming its rank (exit 1)."""
    mine = None
    if error is not None:
        if isinstance(error, UserError):
            mine = (str(error), error.exit_code)
        elif is_no_space(error):
            mine = (f"{out}: no space left on device", 2)
        else:
            rank = comm.Get_rank() if comm is not None else 0
            mine = (f"rank {rank}: {type(error).__name__}: {error}", 1)
        if comm is None and mine[1] == 1:
            raise error  # one process: an unexpected error keeps its traceback
    every = comm.allgather(mine) if comm is not None else [mine]
    first = next((e for e in every if e is not None), None)
    if first is not None:
        message, code = first
        raise (UserError if code == 2 else _RankFailure)(message)


def _share_weights(comm: Any, p: Prepared) -> None:
    """Rank 0's checkpoint into every other rank's model: one read of one file, whatever training does
    to the checkpoint directory meanwhile."""
    from mpi4py import MPI

    from hpcai import checkpoint as ckpt

    header = [(k, a.dtype.str, a.shape) for k, a in p.weights.items()] if comm.Get_rank() == 0 else None
    header, attrs = comm.bcast((header, p.weight_attrs), root=0)
    arrays = {}
    for key, dtype, shape in header:
        a = p.weights[key] if comm.Get_rank() == 0 else np.empty(shape, np.dtype(dtype))
        a = np.ascontiguousarray(a)
        flat = a.reshape(-1).view(np.uint8)
        for at in range(0, len(flat), BCAST_CHUNK):
            comm.Bcast([flat[at : at + BCAST_CHUNK], MPI.BYTE], root=0)
        arrays[key] = a
    if comm.Get_rank() != 0:
        ckpt.unpack_model(ckpt.Payload(arrays, attrs), p.model)
    p.weights = {}


def run(args: argparse.Namespace, comm: Any) -> dict[str, Any] | None:
    """Score and write on this rank (``comm`` None: a single process). Returns the report on rank 0."""
    from hpcai.data.loader import shard_range

    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    out = Path(args.out)
    p: Prepared | None = None
    tmp: Path | None = None
    placed: dict[str, Any] = {}
    error: BaseException | None = None
    restore: Callable[[], None] = lambda: None  # noqa: E731
    try:
        try:  # rank 0 checks everything and lays the file out; the others build the model meanwhile
            if rank == 0:
                p = prepare(args)
                placed = _create(out, name := temp_name(out), len(p.split), p.layout)
                tmp = name  # from here on, removed on any failure
                restore = _remove_on_sigterm(tmp)
            else:
                p = _build(args)
        except Exception as e:  # noqa: BLE001 - agreed on below, reported once
            error = e
        _agree(comm, error, out)
        assert p is not None
        if comm is not None:
            tmp, placed, p.checkpoint, p.step = comm.bcast((tmp, placed, p.checkpoint, p.step), root=0)
            try:
                _share_weights(comm, p)
            except Exception as e:  # noqa: BLE001
                error = e
            _agree(comm, error, out)  # also starts the clock together: model loading is not throughput
        n = len(p.split)
        rows = shard_range(n, rank, world)
        t0 = time.perf_counter()
        counts, score_s = np.zeros(3), 0.0
        try:
            part = score(p, rows.start, rows.stop, args.batch, args.logits or args.probabilities)
            score_s = time.perf_counter() - t0
            target = part["labels"]
            counts = np.array([(part["predictions"] == target).sum(), target.size, len(target)], np.float64)
        except Exception as e:  # noqa: BLE001
            error = e
        # The write token: rank r writes after rank r - 1 closed the file (one writer at a time).
        token = np.zeros(1, np.int64)
        if rank > 0:
            comm.Recv([token, 1, _mpi_int()], source=rank - 1, tag=7)
        try:
            if error is None:
                _write_rows(tmp, rows.start, part, placed)
        except Exception as e:  # noqa: BLE001
            error = e
        finally:
            if rank + 1 < world:
                comm.Send([token, 1, _mpi_int()], dest=rank + 1, tag=7)
        _agree(comm, error, out)
        mine = (counts, score_s)
        every = comm.gather(mine, root=0) if comm is not None else [mine]  # small metadata: pickled is fine
        report = None
        try:
            if rank == 0:
                report = _report(args, p, world, n, every, time.perf_counter() - t0)
                _finish(tmp, out, report)
                tmp = None
        except Exception as e:  # noqa: BLE001
            error = e
        _agree(comm, error, out)
        return report
    finally:
        if tmp is not None and rank == 0:  # anything failed, Ctrl-C included: no temporary left
            try:
                tmp.unlink()
            except OSError:
                pass
        restore()


def _report(args: argparse.Namespace, p: Prepared, world: int, n: int, every: list, wall: float) -> dict:
    correct, targets, written = np.sum([c for c, _ in every], axis=0)
    if int(written) != n:
        raise RuntimeError(f"wrote {int(written)} rows of {n}")
    return {
        "out": str(args.out),
        "run_dir": str(args.run_dir),
        "checkpoint": str(p.checkpoint),
        "step": p.step,
        "dataset": str(Path(args.data).resolve()),
        "split": args.split,
        "ranks": world,
        "rows": n,
        "accuracy": float(correct / max(1.0, targets)),
        "score_s_max": max(s for _, s in every),
        "wall_s": wall,
        "samples_per_s": n / wall if wall > 0 else 0.0,
    }


def _mpi_int():
    from mpi4py import MPI

    return MPI.INT64_T


def predict_command(args: argparse.Namespace) -> int:
    """``hpcai predict ...``: check the input here, then score on ``-n`` ranks (relaunching under mpiexec)."""
    from hpcai.launch import mpi_environment, run_ranks

    if mpi_environment():
        return _rank_main(args)
    if args.ranks > 1:
        prepare(args)  # bad input: one line, exit 2, before any rank starts (rank 0 checks again, cheaply)
        return run_ranks(args.ranks, ["-m", "hpcai", *_argv(args)])
    report = run(args, None)
    _print_report(report)
    return 0


def _print_report(r: dict[str, Any]) -> None:
    ckpt = Path(r["checkpoint"]).name
    print(
        f"predict: {r['rows']} rows of {r['split']} on {r['ranks']} rank(s) with {ckpt} (step {r['step']}) "
        f"-> {r['out']}: accuracy {r['accuracy']:.4f}, {r['samples_per_s']:,.0f} samples/s "
        f"({r['wall_s']:.3f} s, slowest rank scored in {r['score_s_max']:.3f} s)",
        flush=True,
    )


def _rank_main(args: argparse.Namespace) -> int:
    """One rank under mpiexec/srun. Failures every rank agreed on are said once, by rank 0; anything else
    on one rank (a bug between the agreed phases) aborts every rank."""
    from mpi4py import MPI

    from hpcai.comm.abort import abort_job

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if comm.Get_size() != args.ranks and rank == 0:
        print(f"{PROG}: note: running on the {comm.Get_size()} ranks of this MPI world", file=sys.stderr)
    try:
        report = run(args, comm)
    except UserError as e:  # every rank raised the same agreed failure: rank 0 alone says it
        if rank == 0:
            sys.stderr.write(f"hpcai: error: {e}\n")
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - a rank failing outside the agreed phases must not leave others waiting
        line = f"{PROG}: rank {rank}: error: {type(e).__name__}: {e}"
        if comm.Get_size() > 1:
            abort_job(line, 1, comm)
        sys.stderr.write(line + "\n")
        return 1
    if report is not None:
        _print_report(report)
    return 0
