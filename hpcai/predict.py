"""``hpcai predict``: distributed batch inference with a run's newest valid checkpoint, into ONE HDF5 file.

    hpcai predict runs/digits --data data/digits --out preds.h5                    # one process
    hpcai predict runs/digits --data data/digits --out preds.h5 -n 4 --logits --probabilities
    hpcai predict runs/digits --data data/digits --out preds.h5 --split train --overwrite
    mpiexec -n 4 hpcai predict runs/digits --data data/digits --out preds.h5      # already under MPI

The model is rebuilt from ``RUN_DIR/job.toml`` (its [model] section) for the dataset's sample shape and class
count, and loaded from the newest checkpoint in ``RUN_DIR/checkpoints`` that passes its checksums. Rank r
scores the contiguous rows ``[N*r/P, N*(r+1)/P)`` of the split, all ranks at once.

The output (readable with h5py or h5dump alone) holds, for all N rows of the split in row order:
``sample_ids`` (N,) the global row index in the split, ``predictions`` (N, *target) argmax over classes,
``labels`` (N, *target) the dataset's labels, and with ``--logits`` / ``--probabilities`` the float32
``logits`` / softmax ``probabilities`` (N, C, *target); attributes name the run, checkpoint, step, dataset,
split, ranks, accuracy and throughput.

Writing without MPI-IO: h5py here is built without parallel HDF5, and two processes must never have one HDF5
file open for writing. Rank 0 creates the file under a temporary name with every dataset at full size, writes
its slice and closes it; then a token passes rank to rank (``Send``/``Recv`` of one int), and each rank opens
the file, writes its slice and closes it before passing the token on. Writes are serialized, but no rank holds
more than its own slice in memory (gathering everything to rank 0 would). A final gather of per-rank counts
tells rank 0 that every slice is in; it adds the attributes, fsyncs and renames the file to ``--out``. A crash
leaves only the temporary file; ``--out`` appears complete or not at all.

Bad input (no run, no valid checkpoint, a dataset whose samples do not fit the model, an unknown split, an
existing ``--out`` without ``--overwrite``) is one line on stderr and exit status 2, checked before any rank
starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcai.errors import UserError

PROG = "hpcai predict"


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
    checkpoint: Path
    step: int
    num_classes: int


def prepare(args: argparse.Namespace) -> Prepared:
    """Every check of the input, in the order a user would fix them; raises UserError (exit 2)."""
    import torch

    from hpcai import checkpoint as ckpt
    from hpcai.data.shards import ShardedDataset
    from hpcai.models import build_model
    from hpcai.spec import load_spec

    if args.ranks < 1 or args.batch < 1:
        raise UserError(f"-n and --batch must be >= 1, got {args.ranks} and {args.batch}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: already exists; choose another --out or pass --overwrite")
    if not out.parent.is_dir():
        raise UserError(f"{out}: directory {out.parent} does not exist")
    run_dir = Path(args.run_dir)
    job = run_dir / "job.toml"
    if not job.is_file():
        raise UserError(f"{run_dir}: not a run directory (job.toml missing)")
    # The run's own data.path may be gone or elsewhere: the model only needs --data's shapes.
    spec = load_spec(job, [f"data.path={json.dumps(str(args.data))}", 'data.source=""'])
    found = ckpt.find_resumable(run_dir, warn=lambda m: None)
    if found is None:
        raise UserError(f"{ckpt.checkpoint_dir(run_dir)}: no valid checkpoint to predict with")
    path, payload = found
    data = ShardedDataset(args.data)
    if args.split not in data.splits:
        raise UserError(f"{args.data}: no split {args.split!r} (has {', '.join(data.splits)})")
    split = data.splits[args.split]
    where = f"{args.data}: samples {data.sample_shape} with {data.num_classes} classes"
    try:
        model = build_model(spec.model, data.sample_shape, data.num_classes)
        ckpt.unpack_model(payload, model)
    except UserError as e:  # a model that cannot take these samples, or tensors of other shapes
        raise UserError(f"{where} do not fit the model of {run_dir} ({spec.model.name}): {e}") from None
    model.eval()
    if len(split):
        x, y = split.read_range(0, 1)
        try:
            with torch.no_grad():
                logits = model(torch.from_numpy(x))
        except (RuntimeError, IndexError, TypeError) as e:  # e.g. float pixels into an embedding
            raise UserError(f"{where} do not fit the model of {run_dir}: {e}") from None
        if tuple(logits.shape) != (1, data.num_classes, *y.shape[1:]):
            raise UserError(
                f"{where}: the model gives logits {tuple(logits.shape)[1:]} per sample, the labels need "
                f"({data.num_classes}, *{tuple(y.shape[1:])})"
            )
    return Prepared(model, split, data, path, payload.step, data.num_classes)


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


def _create(tmp: Path, n: int, part: dict[str, np.ndarray], probabilities: bool, logits: bool) -> None:
    """Rank 0: the output file with every dataset at full size (N rows), shapes taken from rank 0's part."""
    import h5py

    with h5py.File(tmp, "w", locking=False) as f:
        for name, a in part.items():
            if name != "logits" or logits:
                f.create_dataset(name, (n, *a.shape[1:]), a.dtype)
        if probabilities:
            f.create_dataset("probabilities", (n, *part["logits"].shape[1:]), np.float32)


def _write_slice(tmp: Path, lo: int, part: dict[str, np.ndarray], probabilities: bool, logits: bool) -> None:
    import h5py

    with h5py.File(tmp, "r+", locking=False) as f:
        hi = lo + len(part["sample_ids"])
        for name, a in part.items():
            if name != "logits" or logits:
                f[name][lo:hi] = a
        if probabilities:
            f["probabilities"][lo:hi] = _softmax(part["logits"])


def run(args: argparse.Namespace, comm: Any) -> dict[str, Any] | None:
    """Score and write on this rank (``comm`` None: a single process). Returns the report on rank 0."""
    from hpcai.data.loader import shard_range

    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    p = prepare(args)  # every rank: same inputs, same verdict (so none waits on a rank that gave up)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid() if comm is None else comm.bcast(os.getpid())}")
    n = len(p.split)
    rows = shard_range(n, rank, world)
    if comm is not None:
        comm.Barrier()  # start the clock together: model loading is not throughput
    t0 = time.perf_counter()
    need_logits = args.logits or args.probabilities
    part = score(p, rows.start, rows.stop, args.batch, need_logits)
    score_s = time.perf_counter() - t0
    if rank == 0:
        _create(tmp, n, part, args.probabilities, args.logits)
    # The write token: rank r writes after rank r - 1 closed the file (one HDF5 writer at a time).
    token = np.zeros(1, np.int64)
    if rank > 0:
        comm.Recv([token, 1, _mpi_int()], source=rank - 1, tag=7)
    _write_slice(tmp, rows.start, part, args.probabilities, args.logits)
    if rank + 1 < world:
        comm.Send([token, 1, _mpi_int()], dest=rank + 1, tag=7)
    target = part["labels"]
    counts = np.array([(part["predictions"] == target).sum(), target.size, len(target)], np.float64)
    mine = (counts, score_s)
    every = comm.gather(mine, root=0) if comm is not None else [mine]  # small metadata: pickled is fine
    if rank != 0:
        return None
    correct, targets, written = np.sum([c for c, _ in every], axis=0)
    wall = time.perf_counter() - t0
    report = {
        "out": str(out),
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
    if int(written) != n:
        raise RuntimeError(f"wrote {int(written)} rows of {n}")
    import h5py

    with h5py.File(tmp, "r+", locking=False) as f:
        for key, value in report.items():
            f.attrs[key] = value
    with open(tmp, "rb+") as fh:  # on disk before the name says it is complete
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return report


def _mpi_int():
    from mpi4py import MPI

    return MPI.INT64_T


def predict_command(args: argparse.Namespace) -> int:
    """``hpcai predict ...``: check the input here, then score on ``-n`` ranks (relaunching under mpiexec)."""
    from hpcai.launch import mpi_environment, run_ranks

    if mpi_environment():
        return _rank_main(args)
    prepare(args)  # bad input: one line, exit 2, before any rank starts (the ranks check again, cheaply)
    if args.ranks > 1:
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
    """One rank under mpiexec/srun. A failure on any rank after the checks aborts every rank."""
    from mpi4py import MPI

    from hpcai.comm.abort import abort_job

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if comm.Get_size() != args.ranks and rank == 0:
        print(f"{PROG}: note: running on the {comm.Get_size()} ranks of this MPI world", file=sys.stderr)
    try:
        report = run(args, comm)
    except UserError as e:  # every rank reached the same verdict in prepare(): rank 0 alone says it
        if rank == 0:
            sys.stderr.write(f"hpcai: error: {e}\n")
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - a rank failing mid-write must not leave others waiting
        line = f"{PROG}: rank {rank}: error: {type(e).__name__}: {e}"
        if comm.Get_size() > 1:
            abort_job(line, 1, comm)
        sys.stderr.write(line + "\n")
        return 1
    if report is not None:
        _print_report(report)
    return 0
