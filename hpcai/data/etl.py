"""Build sharded HDF5 datasets, on one process or on every rank of an MPI job.

Layout of a dataset directory (readable with h5py or h5dump alone)::

    DIR/manifest.json              counts, shapes, dtypes, splits, per-shard SHA-256, normalisation stats
    DIR/train-00000-of-00004.h5    datasets x (N, *shape) and y (N,), chunked by rows; with the default
                                   checksum "crc32c", x_crc32c (a CRC-32C per chunk of x) and
                                   y.attrs["crc32c"]
    DIR/val-00000-of-00001.h5      (only with --val-fraction > 0 or val_*.npy files)
    DIR/test-00000-of-00001.h5

Command lines::

    hpcai data build digits --out data/digits --shards 4
    hpcai data build /tmp/big.npz --out /tmp/big -n 2 --shards 8 --val-fraction 0.1
    mpiexec -n 4 hpcai data build images/ --out data/img      # already under MPI: every rank in-process
    python -m hpcai.data.etl digits data/digits               # one process, defaults

Every rank writes the shards ``r, r + world, ...`` of the list of all shards of all splits. The directory is
built under a temporary name beside DIR (``.DIR.tmp-HOST-PID-TOKEN``) and renamed by rank 0 after every
rank reported success, so a crash never leaves a half-built dataset that looks valid. Any failure, and any
``BaseException`` (``KeyboardInterrupt``, a ``SystemExit`` raised by a signal handler), removes the temporary
directory on rank 0 and is re-raised; a killed build's leftovers are removed by the next build of DIR.

Rank 0 holds DIR's lock (:mod:`hpcai.data.publish`) from its first check to the final rename: a second build
of DIR is refused, never mixed in. Before writing, rank 0 checks that the uncompressed shards fit the free
space; shards are written through :mod:`hpcai.data.h5write`, so a full disk is one line naming the file
(exit 2), never HDF5's crash, and an existing dataset at DIR stays as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from hpcai.crc import crc32c
from hpcai.data.h5write import h5_create
from hpcai.data.manifest import FORMAT_VERSION
from hpcai.data.publish import check_free_space, lock_output, publish, remove_stale_builds
from hpcai.data.sources import Source, open_source
from hpcai.errors import DatasetError, UserError
from hpcai.fsio import NoSpaceError, atomic_write_text, is_no_space, no_space, temp_name

CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: big sequential reads; random batches come from the loader's cache
BLOCK_BYTES = 64 << 20  # rows transformed and written per step: bounds memory whatever the shard size
CHECKSUMS = ("crc32c", "fletcher32", "none")
COMPRESSION = {
    "none": {},
    "gzip": {"compression": "gzip", "compression_opts": 4},
    "lzf": {"compression": "lzf"},
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: 1,797 8x8 grey images (0..16) as (N, 1, 8, 8) float32 in [0, 1]."""
    from sklearn.datasets import load_digits  # bundled with the package: no network

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, d.target.astype(np.int64)


def split_indices(
    n: int, test_fraction: float, seed: int, val_fraction: float = 0.0, name: str = "source"
) -> tuple[np.ndarray, ...]:
    """A seeded permutation cut into sorted (train, test) index arrays, or (train, test, val) with val rows.

    The test rows are the permutation's head whatever ``val_fraction`` is, so adding a val split never moves a
    sample into or out of the test set. Every split gets at least one row, or DatasetError naming ``name``.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    n_val = max(1, int(round(n * val_fraction))) if val_fraction else 0
    if n_test + n_val >= n:
        splits = f"test fraction {test_fraction}" + (f" and val fraction {val_fraction}" if n_val else "")
        raise DatasetError(
            f"{name}: {n} sample{'s' if n != 1 else ''} cannot make a training split and a test split "
            f"with {splits} (each split needs at least 1 sample: at least {n_test + n_val + 1} needed)"
        )
    if not val_fraction:
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    return np.sort(perm[n_test + n_val :]), np.sort(perm[:n_test]), np.sort(perm[n_test : n_test + n_val])


class Moments:
    """Per-channel count, mean and M2 (Chan et al.'s parallel merge: stable where sum of squares is not)."""

    def __init__(self, channels: int):
        self.n, self.mean, self.m2 = 0, np.zeros(channels), np.zeros(channels)

    def add(self, x: np.ndarray) -> None:
        xs = x.reshape(len(x), len(self.mean), -1).astype(np.float64)
        n = xs.shape[0] * xs.shape[2]
        mean = xs.mean(axis=(0, 2))
        m2 = ((xs - mean[None, :, None]) ** 2).sum(axis=(0, 2))
        self.merge(n, mean, m2)

    def merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.n * n / total
        self.n = total

    def summary(self) -> dict:
        overall = Moments(1)
        for c in range(len(self.mean)):
            overall.merge(self.n, self.mean[c : c + 1], self.m2[c : c + 1])
        std = np.sqrt(self.m2 / max(1, self.n))
        return {
            "mean": float(overall.mean[0]),
            "std": float(np.sqrt(overall.m2[0] / max(1, overall.n))),
            "channel_mean": [float(v) for v in self.mean],
            "channel_std": [float(v) for v in std],
        }


def plan_shards(split_rows: dict[str, np.ndarray], shards: int) -> list[dict]:
    """Every shard of every split: name and source rows. ``shards`` for train, a quarter of it for others."""
    plan = []
    for split, idx in split_rows.items():
        n_want = shards if split == "train" else max(1, shards // 4)
        bounds = np.linspace(0, len(idx), min(n_want, max(1, len(idx))) + 1).astype(int)
        n_files = len(bounds) - 1
        for i in range(n_files):
            plan.append(
                {
                    "split": split,
                    "file": f"{split}-{i:05d}-of-{n_files:05d}.h5",
                    "first_row": int(bounds[i]),
                    "rows": idx[bounds[i] : bounds[i + 1]],
                }
            )
    return plan


def write_shard(
    out: Path, task: dict, src: Source, compression: str, checksum: str, progress: Callable
) -> dict:
    """Transform and write one shard block by block; return its manifest entry and train statistics."""
    rows = task["rows"]
    row_bytes = max(1, int(np.prod(src.sample_shape)) * src.x_dtype.itemsize)
    chunk = int(max(1, min(len(rows), CHUNK_BYTES // row_bytes)))
    block = max(
        chunk, BLOCK_BYTES // row_bytes // chunk * chunk
    )  # whole chunks per block: no chunk rewritten
    moments = Moments(src.sample_shape[0] if len(src.sample_shape) >= 2 else 1)
    path = out / task["file"]
    filters = dict(COMPRESSION[compression], fletcher32=checksum == "fletcher32")
    crcs: list[int] = []  # checksum "crc32c": one CRC-32C per chunk of x's rows, as the reader sees them
    # All of x's chunks allocated at creation, in row order, back to back: an unfiltered shard is then one
    # plain run of bytes that the reader can preadv/memory-map (see shards._Shard). No fill pass.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    # Through h5write: a full disk or a signal is raised here as one exception, after HDF5 closed cleanly.
    with h5_create(path) as (f, check):
        # Chunks of whole rows, ~1 MiB: a sequential read is a few large reads. A checksum per chunk lets the
        # reader catch a corrupted shard at read time, naming the file: "crc32c" (default) is ours, stored in
        # x_crc32c beside unfiltered data that the reader reads like dd (CRC-32C runs at ~16 GB/s a core
        # without the GIL, see hpcai.crc); "fletcher32" is HDF5's filter, checked inside HDF5 at ~1.4 GB/s.
        dx = f.create_dataset(
            "x",
            (len(rows), *src.sample_shape),
            src.x_dtype,
            chunks=(chunk, *src.sample_shape),
            dcpl=dcpl,
            **filters,
        )
        y_shape = src.y.shape[1:]  # () for labels, (T,) for next-token targets
        y_chunk = max(1, min(len(rows), (1 << 17) // max(1, int(np.prod(y_shape)))))
        dy = f.create_dataset("y", (len(rows), *y_shape), np.int64, chunks=(y_chunk, *y_shape), **filters)
        for lo in range(0, len(rows), block):
            x, y = src.rows(rows[lo : lo + block])
            dx[lo : lo + len(x)] = x
            dy[lo : lo + len(y)] = y
            check()  # a failed write (or an interrupt) stops the shard now, not after all its blocks
            if checksum == "crc32c":
                xs = np.ascontiguousarray(x, dtype=src.x_dtype)
                crcs += [crc32c(xs[c : c + chunk]) for c in range(0, len(xs), chunk)]
            if task["split"] == "train":
                moments.add(x)
            progress(x.nbytes + y.nbytes, len(x))
        if checksum == "crc32c":
            f.create_dataset("x_crc32c", data=np.array(crcs, np.uint32))
            dy.attrs["crc32c"] = np.uint32(crc32c(np.ascontiguousarray(dy[:])))
        f.attrs["split"] = task["split"]
        f.attrs["first_row"] = task["first_row"]
    entry = {
        "file": task["file"],
        "rows": int(len(rows)),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    return {
        "split": task["split"],
        "entry": entry,
        "moments": (moments.n, moments.mean, moments.m2),
        "chunk": chunk,
    }


class _Progress:
    """Rank 0's progress line: its own bytes and rows, extrapolated to the world (ranks share work evenly)."""

    def __init__(self, log: Callable, world: int, total_rows: int, enabled: bool):
        self.log, self.world, self.total, self.enabled = log, world, total_rows, enabled
        self.t0 = self.last = time.perf_counter()
        self.bytes = self.rows = 0

    def __call__(self, nbytes: int, nrows: int) -> None:
        self.bytes += nbytes
        self.rows += nrows
        now = time.perf_counter()
        if self.enabled and now - self.last > 2.0:
            self.last = now
            dt = now - self.t0
            done = min(self.total, self.rows * self.world)
            self.log(
                f"build: ~{done:,}/{self.total:,} rows, {self.world * self.bytes / dt / 1e6:.0f} MB/s (est.)"
            )


def _collective(comm, fn: Callable, root_only: bool = False):
    """Run ``fn`` (on rank 0 only if ``root_only``); every rank learns every rank's result or error.

    Errors travel as (user error class or None, message) instead of aborting, so all ranks leave the build
    together and rank 0 can remove the temporary directory: no rank waits forever in a collective, nothing
    is left behind. A full disk (``OSError`` ENOSPC from anywhere) travels as the user error it is.
    """
    rank = comm.Get_rank() if comm is not None else 0
    try:
        result = (True, fn()) if (not root_only or rank == 0) else (True, None)
    except UserError as e:
        result = (False, (type(e), str(e)))
    except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised below
        if is_no_space(e):
            result = (False, (NoSpaceError, str(no_space(getattr(e, "filename", None) or "dataset", e))))
        else:
            result = (False, (None, f"rank {rank}: {type(e).__name__}: {e}"))
    if comm is not None:
        _arrive(comm)
    results = comm.allgather(result) if comm is not None else [result]
    for ok, value in results:
        if not ok:
            cls, msg = value
            if cls is None:
                raise RuntimeError(msg)
            try:
                error = cls(msg)
            except TypeError:  # a subclass that takes other arguments: the message is what counts
                error = DatasetError(msg)
            raise error
    return [value for _, value in results]


def _arrive(comm, poll_s: float = 0.002) -> None:
    """Wait for every rank in a loop of MPI_Test and sleeps rather than inside a blocking MPI call: Python
    runs signal handlers only between bytecodes, so a rank waiting here still stops on SIGTERM/SIGINT."""
    if comm.Get_size() > 1:
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(poll_s)


def _estimate_bytes(src: Source, plan: list[dict], compression: str) -> int:
    """The shards' size before compression (x, y, checksums, HDF5's own ~64 KiB a file); 0 if compressed."""
    if compression != "none":
        return 0  # compressed size is unknown beforehand: a full disk is then caught while writing
    row = int(np.prod(src.sample_shape)) * src.x_dtype.itemsize + int(np.prod(src.y.shape[1:])) * 8
    rows = sum(len(t["rows"]) for t in plan)
    return rows * row + len(plan) * (64 << 10) + rows * row // (CHUNK_BYTES // 4)


def build_dataset(
    source: str,
    out: str | Path,
    shards: int = 4,
    test_fraction: float = 0.2,
    seed: int = 0,
    log: Callable = print,
    *,
    val_fraction: float = 0.0,
    compression: str = "none",
    checksum: str = "crc32c",
    label_column: str = "label",
    overwrite: bool = False,
    comm=None,
    tmp_name: str | None = None,
    wait: bool = True,
) -> Path:
    """Build ``source`` into a sharded dataset at ``out``; every rank of ``comm`` (None: just this process)
    writes its share of the shards. Refuses an existing ``out`` unless ``overwrite``.

    Another build of ``out`` in progress: with ``wait`` (the default: the training worker's automatic build,
    two sweep trials needing one dataset) wait for it and use what it built; without (``hpcai data build``)
    DatasetError at once. Any exception, ``BaseException`` included, removes this build's temporary files
    before it is re-raised.
    """
    out = Path(out)
    rank = comm.Get_rank() if comm is not None else 0
    world = comm.Get_size() if comm is not None else 1
    say = log if rank == 0 else (lambda *_: None)
    t0 = time.perf_counter()
    if compression not in COMPRESSION:
        raise UserError(f"--compression: {compression!r} is not one of {', '.join(COMPRESSION)}")
    if checksum not in CHECKSUMS:
        raise UserError(f"--checksum: {checksum!r} is not one of {', '.join(CHECKSUMS)}")
    lock = None
    tmp: Path | None = None  # rank 0 removes it on any failure

    def prepare() -> str | None:
        nonlocal lock, tmp
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"{out.parent}: cannot create the directory: {e.strerror}") from None
        lock = lock_output(out, wait=wait, say=say)  # held until the dataset is published (or not)
        if out.exists():
            if lock.waited and not overwrite and (out / "manifest.json").is_file():
                return None  # built meanwhile by the build we waited for: use it
            if not overwrite:
                raise DatasetError(
                    f"{out}: already exists; remove it, choose another --out, or pass --overwrite"
                )
            if not out.is_dir() or (not (out / "manifest.json").is_file() and any(out.iterdir())):
                raise DatasetError(
                    f"{out}: exists and is not a dataset (no manifest.json); not overwriting it"
                )
        remove_stale_builds(out)  # what killed builds of `out` left: no live writer, we hold the lock
        tmp = out.parent / (tmp_name or temp_name(out).name)  # set first: a signal after mkdir still cleans
        tmp.mkdir()
        return str(tmp)

    try:
        name = _collective(comm, prepare, root_only=True)[0]
        if name is None:
            say(f"{out}: built meanwhile by another process: using it")
            return out
        tmp = Path(name)
        box: dict = {}  # this rank's source and plan (the plan's row lists stay local: not gathered)

        def plan_build() -> dict:
            src = box["src"] = open_source(source, label_column)  # metadata and labels; rows come lazily
            num_classes = src.class_count()  # labels in [0, num_classes), num_classes bounded
            if src.splits is not None:
                split_rows = src.splits
            else:
                parts = split_indices(len(src), test_fraction, seed, val_fraction, name=src.name)
                split_rows = dict(zip(("train", "test", "val"), parts, strict=False))
            plan = box["plan"] = plan_shards(split_rows, shards)
            if rank == 0:
                check_free_space(out, _estimate_bytes(src, plan, compression))
            return {"split_rows": {k: len(v) for k, v in split_rows.items()}, "num_classes": num_classes}

        info = _collective(comm, plan_build)[0]
        src, plan = box["src"], box["plan"]

        def transform() -> list[dict]:
            progress = _Progress(say, world, len(src), enabled=rank == 0)
            done = []
            for t in plan[rank::world]:
                try:
                    done.append(write_shard(tmp, t, src, compression, checksum, progress))
                except NoSpaceError:  # named after what the user asked for, not our temporary directory
                    raise NoSpaceError(f"{out}: no space left on device (writing {t['file']})") from None
            return done

        per_rank = _collective(comm, transform)

        def commit() -> None:
            results = {r["entry"]["file"]: r for part in per_rank for r in part}
            moments = Moments(src.sample_shape[0] if len(src.sample_shape) >= 2 else 1)
            splits: dict[str, dict] = {s: {"rows": n, "shards": []} for s, n in info["split_rows"].items()}
            for t in plan:
                r = results[t["file"]]
                splits[t["split"]]["shards"].append(r["entry"])
                if t["split"] == "train":
                    moments.merge(*r["moments"])
            manifest = {
                "format": "hpcai-sharded-hdf5",
                "version": FORMAT_VERSION,
                "source": source,
                "sample_shape": list(src.sample_shape),
                "x_dtype": str(src.x_dtype),
                "y_dtype": "int64",
                "y_shape": list(src.y.shape[1:]),
                "num_classes": info["num_classes"],
                "classes": src.classes,
                "split_seed": seed,
                "test_fraction": test_fraction if src.splits is None else None,
                "val_fraction": val_fraction if src.splits is None else None,
                "compression": compression,
                "checksum": checksum,
                "chunk_rows": max(r["chunk"] for r in results.values()),
                # Statistics of the training split only, so the val and test splits stay unseen.
                "normalization": moments.summary(),
                "built_with_ranks": world,
                "splits": splits,
            }
            try:
                atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
            except NoSpaceError:
                raise NoSpaceError(f"{out}: no space left on device (writing manifest.json)") from None
            publish(tmp, out)  # under the lock; an existing dataset is swapped out in one rename

        _collective(comm, commit, root_only=True)
    except BaseException:
        if rank == 0 and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()
    rows = sum(info["split_rows"].values())
    nbytes = sum(r["entry"]["bytes"] for part in per_rank for r in part)
    dt = time.perf_counter() - t0
    counts = ", ".join(f"{v} {k}" for k, v in info["split_rows"].items())
    say(
        f"built {out}: {rows} samples ({counts}) on {world} rank(s) in {dt:.2f} s "
        f"({nbytes / dt / 1e6:.0f} MB/s, {rows / dt:,.0f} samples/s)"
    )
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m hpcai.data.etl SOURCE OUT_DIR")
    build_dataset(sys.argv[1], sys.argv[2])
