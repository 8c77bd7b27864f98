"""Read a sharded HDF5 dataset (see :mod:`hpcai.data.etl` for the layout).

Rows are addressed by a global index within a split; a read touches only the shard files that hold the rows.
Two paths, chosen per shard when it is opened:

- **raw**: shards built without compression and with ``--checksum crc32c`` (the default) or ``none`` store
  ``x`` as plain bytes (chunks laid out in order, which we check). We read them like ``dd`` does: ``preadv``
  into the caller's array for runs of rows, a memory map for scattered rows. No HDF5 call per batch; the GIL
  is released while copying.
- **h5py**: anything filtered (Fletcher32, gzip, lzf) goes through HDF5, which verifies and decodes every
  chunk; scattered rows are read as merged runs (a few slices), not h5py's slow per-point selection.

Checksum "crc32c": every chunk of x is checked against ``x_crc32c`` the first time any of its rows is read in
this process (a sequential read checks the rows it just read; a scattered read reads the chunk whole once),
so a corrupted shard fails at read time naming the file and rows, and later epochs pay nothing.

A split can also be cached in memory (:meth:`ShardedSplit.cache`): one sequential pass, then batches are numpy
slices. The loader does that when the split fits its budget.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

from hpcai.crc import crc32c
from hpcai.data.etl import sha256_file
from hpcai.data.manifest import validate_manifest
from hpcai.errors import DatasetError

SEQ_BLOCK_BYTES = 4 << 20  # read_range with threads: block size (dd's bs=4M)
RUN_GAP_BYTES = 256 << 10  # h5py path: read across gaps up to this size rather than issue another slice read


class _Shard:
    """One open shard file: h5py handle, labels in memory, and the raw byte layout of x when it has one."""

    def __init__(
        self,
        path: Path,
        sample_shape: tuple[int, ...],
        rows: int,
        x_dtype: np.dtype | None = None,
        num_classes: int | None = None,
    ):
        self.path = path
        self.x_dtype, self.num_classes = x_dtype, num_classes
        try:
            self.h5 = h5py.File(path, "r")
        except (OSError, FileNotFoundError) as e:
            raise DatasetError(f"{path}: cannot open shard: {e}") from None
        try:  # a damaged file can fail anywhere in HDF5's metadata, with any of these
            self._read_meta(sample_shape, rows)
        except DatasetError:
            self.h5.close()
            raise
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            self.h5.close()
            raise DatasetError(f"{path}: read failed (corrupt shard?): {e}") from None
        self.row_bytes = int(np.prod(sample_shape)) * self.x.dtype.itemsize
        self.offset = self._raw_offset()
        self.fd = os.open(path, os.O_RDONLY) if self.offset is not None else None
        self._mm: np.ndarray | None = None

    def _read_meta(self, sample_shape: tuple[int, ...], rows: int) -> None:
        """x's shape against the manifest, y (whole), and x_crc32c / y's CRC-32C where the shard has them."""
        for key in ("x", "y"):
            if key not in self.h5:
                raise DatasetError(f"{self.path}: dataset '{key}' missing")
        self.x = self.h5["x"]
        if self.x.shape[1:] != sample_shape or len(self.x) != len(self.h5["y"]) or len(self.x) != rows:
            raise DatasetError(
                f"{self.path}: x{self.x.shape} / y{self.h5['y'].shape} do not match the manifest "
                f"({rows} rows of {sample_shape})"
            )
        if self.x_dtype is not None and self.x.dtype != self.x_dtype:
            raise DatasetError(f"{self.path}: x holds {self.x.dtype}, manifest.json says {self.x_dtype}")
        self.y = self.h5["y"][:]
        # Labels outside 0..num_classes-1 would fail inside the loss, far from the file that holds them.
        if (
            self.num_classes is not None
            and len(self.y)
            and (self.y.min() < 0 or self.y.max() >= self.num_classes)
        ):
            lo, hi = int(self.y.min()), int(self.y.max())
            raise DatasetError(
                f"{self.path}: labels {lo}..{hi} outside 0..{self.num_classes - 1} "
                "(num_classes in manifest.json)"
            )
        self.crc = self.h5["x_crc32c"][:] if "x_crc32c" in self.h5 else None
        if self.crc is None:
            return
        self.chunk_rows = self.x.chunks[0] if self.x.chunks else max(1, rows)
        if len(self.crc) != -(-rows // self.chunk_rows):
            raise DatasetError(f"{self.path}: x_crc32c holds {len(self.crc)} checksums for x's chunks")
        self.verified = np.zeros(len(self.crc), bool)  # chunks checked once per process
        want = self.h5["y"].attrs.get("crc32c")
        if want is not None and crc32c(np.ascontiguousarray(self.y)) != int(want):
            raise DatasetError(f"{self.path}: y fails its CRC-32C (corrupt shard)")

    def _raw_offset(self) -> int | None:
        """Byte offset of x's rows if they lie in the file as one plain run, else None"""
        d = self.x
        if len(d) == 0 or d.compression or d.fletcher32 or d.shuffle or d.scaleoffset:
            return None
        if d.chunks is None:
            offset = d.id.get_offset()
        else:
            n_chunks = d.id.get_num_chunks()
            chunk_bytes = d.chunks[0] * self.row_bytes
            if d.chunks[1:] != d.shape[1:] or n_chunks != -(-len(d) // d.chunks[0]):
                return None
            infos = [d.id.get_chunk_info(k) for k in range(n_chunks)]
            offset = infos[0].byte_offset
            for k, info in enumerate(infos):
                if info.chunk_offset[0] != k * d.chunks[0] or info.byte_offset != offset + k * chunk_bytes:
                    return None
        if offset is None or offset + len(d) * self.row_bytes > os.path.getsize(self.path):
            raise DatasetError(f"{self.path}: truncated (x's data runs past the end of the file)")
        return int(offset)

    def read_rows(self, lo: int, out: np.ndarray, check: bool = True) -> None:
        """Rows ``lo : lo + len(out)`` into ``out`` (contiguous), checked against x_crc32c where present
        (unless ``check`` is False: the caller calls :meth:`check_rows` on them)."""
        self._read_rows(lo, out)
        if check:
            self.check_rows(lo, out)

    def check_rows(self, lo: int, out: np.ndarray) -> None:
        """Check the chunks of rows ``lo : lo + len(out)``, just read into ``out``, not checked yet."""
        if self.crc is not None and len(out):
            self._verify(lo // self.chunk_rows, (lo + len(out) - 1) // self.chunk_rows + 1, lo, out)

    def _verify(self, c0: int, c1: int, lo: int = 0, out: np.ndarray | None = None) -> None:
        """Check chunks ``c0 : c1`` not checked yet in this process. A chunk wholly inside the rows just read
        (``out``, from row ``lo``) is checked there; one only partly read is read whole first."""
        k = self.chunk_rows
        for c in np.flatnonzero(~self.verified[c0:c1]) + c0:
            a, b = int(c) * k, min(int(c + 1) * k, len(self.x))
            if out is not None and a >= lo and b <= lo + len(out):
                rows = out[a - lo : b - lo]
            else:
                rows = np.empty((b - a, *self.x.shape[1:]), self.x.dtype)
                self._read_rows(a, rows)
            if crc32c(rows) != int(self.crc[c]):
                raise DatasetError(f"{self.path}: rows {a}-{b - 1} fail their CRC-32C (corrupt shard)")
            self.verified[c] = True

    def _read_rows(self, lo: int, out: np.ndarray) -> None:
        if self.fd is not None:
            view = memoryview(out.reshape(-1).view(np.uint8))
            pos, done = self.offset + lo * self.row_bytes, 0
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], pos + done)
                if n <= 0:
                    raise DatasetError(f"{self.path}: truncated (short read at byte {pos + done})")
                done += n
            return
        try:
            self.x.read_direct(out, np.s_[lo : lo + len(out)], np.s_[0 : len(out)])
        except OSError as e:  # Fletcher32 mismatch, a bad gzip stream or a truncated file
            raise DatasetError(f"{self.path}: read failed (corrupt shard?): {e}") from None

    def gather(self, local: np.ndarray) -> np.ndarray:
        """Rows ``local`` (sorted, unique) as a new array."""
        if self.crc is not None:
            chunks = np.unique(local // self.chunk_rows)
            for c in chunks[~self.verified[chunks]]:
                self._verify(int(c), int(c) + 1)
        if self.fd is not None:
            if self._mm is None:
                self._mm = np.memmap(
                    self.path, self.x.dtype, "r", self.offset, (len(self.x), *self.x.shape[1:])
                )
            return self._mm[local]
        # Merge rows into runs that bridge small gaps: one slice read per run, then select in numpy.
        gap = max(1, RUN_GAP_BYTES // max(1, self.row_bytes))
        cuts = np.flatnonzero(np.diff(local) > gap) + 1
        parts = []
        for run in np.split(local, cuts):
            block = np.empty((int(run[-1] - run[0] + 1), *self.x.shape[1:]), self.x.dtype)
            self.read_rows(int(run[0]), block)
            parts.append(block[run - run[0]])
        return np.concatenate(parts)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._mm = None
        self.h5.close()


class ShardedSplit:
    """One split (train, val or test) of a dataset: shard files opened lazily, read by global row index."""

    def __init__(
        self,
        root: Path,
        split: str,
        entry: dict,
        sample_shape: tuple[int, ...],
        x_dtype: str = "float32",
        num_classes: int | None = None,
    ):
        self.root, self.split, self.num_classes = root, split, num_classes
        self.files = [root / s["file"] for s in entry["shards"]]
        rows = np.array([s["rows"] for s in entry["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(rows)])  # shard i holds rows offsets[i]:offsets[i+1]
        self.rows = int(self.offsets[-1])
        self.sample_shape = sample_shape
        self.x_dtype = np.dtype(x_dtype)
        self.row_bytes = int(np.prod(sample_shape)) * self.x_dtype.itemsize
        self._shards: dict[int, _Shard] = {}
        self._lock = threading.Lock()
        self._cache: tuple[np.ndarray, np.ndarray] | None = None
        if self.rows != entry["rows"]:
            raise DatasetError(
                f"{root}/manifest.json: splits.{split}.rows is {entry['rows']} but shards hold {self.rows}"
            )

    def __len__(self) -> int:
        return self.rows

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def _open(self, i: int) -> _Shard:
        with self._lock:  # reader threads may ask for the same shard at once: open it once
            if i not in self._shards:
                rows = int(self.offsets[i + 1] - self.offsets[i])
                self._shards[i] = _Shard(
                    self.files[i], self.sample_shape, rows, self.x_dtype, self.num_classes
                )
            return self._shards[i]

    def read_range(
        self, lo: int, hi: int, out: np.ndarray | None = None, threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``lo:hi`` as (x, y), into ``out`` if given: one sequential read per shard touched. With
        ``threads`` > 1 this thread reads ~4 MiB blocks in order while ``threads - 1`` others checksum the
        blocks already read, so reading from disk overlaps checking (both release the GIL) and the disk
        still sees one sequential stream (parallel readers would defeat the kernel's read-ahead)."""
        x = out if out is not None else np.empty((hi - lo, *self.sample_shape), self.x_dtype)
        ys, pending = [], []
        pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="hpcai-check") if threads > 1 else None
        try:
            first = int(np.searchsorted(self.offsets, lo, side="right") - 1)
            pos = lo
            for i in range(first, len(self.files)):
                if pos >= hi:
                    break
                a, b = pos - int(self.offsets[i]), min(hi, int(self.offsets[i + 1])) - int(self.offsets[i])
                shard = self._open(i)
                view = x[pos - lo : pos - lo + b - a]
                if pool is None or shard.crc is None:
                    shard.read_rows(a, view)
                else:  # blocks on the shard's chunk boundaries: each chunk checked from one block
                    k = shard.chunk_rows
                    step = max(k, SEQ_BLOCK_BYTES // max(1, self.row_bytes) // k * k)
                    for s0 in range(a, b, step):
                        s1 = min(b, (s0 // step + 1) * step)
                        part = view[s0 - a : s1 - a]
                        shard.read_rows(s0, part, check=False)
                        pending.append(pool.submit(shard.check_rows, s0, part))
                ys.append(shard.y[a:b])
                pos += b - a
            for f in pending:
                f.result()  # a corrupt chunk raises here
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return x, (np.concatenate(ys) if ys else np.empty((0,), np.int64))

    def read(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``index`` (any order, no repeats) as (x, y), in the order asked."""
        index = np.asarray(index, dtype=np.int64)
        if self._cache is not None:
            return self._cache[0][index], self._cache[1][index]
        order = np.argsort(index, kind="stable")
        sorted_idx = index[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        xs, ys = [], []
        for i in np.unique(shard_of):
            local = sorted_idx[shard_of == i] - self.offsets[i]
            shard = self._open(int(i))
            xs.append(shard.gather(local))
            ys.append(shard.y[local])
        x = np.concatenate(xs) if xs else np.empty((0, *self.sample_shape), self.x_dtype)
        y = np.concatenate(ys) if ys else np.empty((0,), np.int64)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return x[inverse], y[inverse]

    def cache(self, budget_bytes: int, threads: int = 3) -> bool:
        """Hold the whole split in memory if it fits ``budget_bytes`` (one sequential pass, ``threads``
        reading); True if cached"""
        if self._cache is None and self.nbytes <= budget_bytes:
            self._cache = self.read_range(0, self.rows, threads=threads)
        return self._cache is not None

    def close(self) -> None:
        for s in self._shards.values():
            s.close()
        self._shards.clear()


class ShardedDataset:
    """A dataset directory: its manifest and its splits (train and test required, val optional)."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.root = Path(path)
        mpath = self.root / "manifest.json"
        try:
            self.manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError(f"{mpath}: no dataset here (manifest.json missing)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{mpath}: not valid JSON: {e}") from None
        except OSError as e:
            raise DatasetError(f"{mpath}: cannot read: {e.strerror or e}") from None
        m = validate_manifest(self.manifest, mpath)  # every key checked before anything is built from it
        self.sample_shape = tuple(m["sample_shape"])
        self.num_classes = m["num_classes"]
        self.splits = {
            name: ShardedSplit(
                self.root, name, entry, self.sample_shape, m.get("x_dtype", "float32"), self.num_classes
            )
            for name, entry in m["splits"].items()
        }
        if verify:
            self.verify()

    def check_files(self) -> list[str]:
        """Every shard's presence, size and SHA-256 against the manifest; one message per problem."""
        problems = []
        for entry in self.manifest["splits"].values():
            for s in entry["shards"]:
                f = self.root / s["file"]
                if not f.is_file():
                    problems.append(f"{f}: shard missing")
                elif "bytes" in s and f.stat().st_size != s["bytes"]:
                    problems.append(
                        f"{f}: size {f.stat().st_size} != {s['bytes']} in manifest.json (truncated?)"
                    )
                elif "sha256" in s and sha256_file(f) != s["sha256"]:
                    problems.append(f"{f}: checksum mismatch with manifest.json (corrupt or modified shard)")
        return problems

    def verify(self) -> None:
        """Check every shard's SHA-256 against the manifest (reads every byte once)."""
        problems = self.check_files()
        if problems:
            raise DatasetError(problems[0])

    def close(self) -> None:
        for s in self.splits.values():
            s.close()
