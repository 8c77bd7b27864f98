"""``hpcai bench io``: our reader and loader against the raw bytes and torch's DataLoader, side by side.

    python -c "import numpy as np; r = np.random.default_rng(0); np.savez('/tmp/io.npz', \\
        x=r.standard_normal((40000, 3, 32, 32), dtype=np.float32), y=r.integers(0, 10, 40000))"   # 492 MB
    hpcai data build /tmp/io.npz --out /tmp/io-crc -n 2 --shards 8       # default checksum crc32c
    hpcai bench io /tmp/io-crc --json io.json
    python -m hpcai.bench.io /tmp/io-crc               # the same

Measured, each the best of ``--repeats`` passes, twice: with a **cold page cache** (the headline keys;
passes interleaved, dd then ours, so that both sample the disk at the same moments; before every pass each
file is fsync'd and evicted with ``posix_fadvise(DONTNEED)``, which needs no root, and ``fincore`` reports
what stayed resident) and with a **warm** one (the files read once first; ``*_warm`` keys). Each pass of
ours opens the dataset afresh, so with checksum "crc32c" every pass verifies every chunk, as a new training
process would:

- raw_GBps: ``dd bs=4M of=/dev/null`` over the split's shard files (the bytes on disk, headers included).
- ours_GBps: :meth:`ShardedSplit.read_range` reading the split start to end into one array in ~4 MiB
  blocks, one thread reading in order and two checking what was read, as the loader's cache fill does,
  checksums verified (the data bytes over the time); ours_vs_raw their ratio; ours_1thread_GBps the same
  read by one thread (reading and checking take turns).
- chunked_GBps / contiguous_GBps: the same reader on the first shard as built (chunked) and on a copy of it
  with HDF5's contiguous layout (written to a temporary file).
- ours_samples_per_s: one epoch of :class:`BatchLoader` (shuffled, batch ``--batch``), cache fill included.
- torch_dataloader_samples_per_s: ``torch.utils.data.DataLoader`` (shuffle, same batch) over a map-style
  dataset reading one row per ``__getitem__`` from the same shards with h5py; best of 0, 1 and 2 workers,
  each with h5py's default 1 MiB chunk cache and with a 64 MiB one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from hpcai.crc import crc32c
from hpcai.data.loader import BatchLoader
from hpcai.data.shards import ShardedDataset, ShardedSplit
from hpcai.errors import UserError

MAX_S = 4.0  # a loader measurement stops after this long (rates are still samples / seconds)


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (no root needed; dirty pages are written first)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' bytes in the page cache, from util-linux ``fincore`` (None without it)."""
    try:
        p = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", *map(str, files)],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(v) for v in p.stdout.split()) / max(1, sum(f.stat().st_size for f in files))


def _best(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def raw_seconds(files: list[Path], repeats: int, cold: bool = False) -> float:
    def dd() -> float:
        # dd's own timing (its "copied, S s" line): process start-up is not read bandwidth.
        total = 0.0
        for f in files:
            if cold:
                evict([f])
            p = subprocess.run(
                ["dd", f"if={f}", "of=/dev/null", "bs=4M"], check=True, capture_output=True, text=True
            )
            total += float(p.stderr.strip().splitlines()[-1].split(",")[-2].split()[0])
        return total

    return min(dd() for _ in range(repeats))


def sequential_seconds(open_split, repeats: int, cold: bool = False, threads: int = 3) -> float:
    """Best time to read a freshly opened split (``open_split()``) start to end into one array, as the
    loader's cache fill does (~4 MiB blocks, ``threads`` readers); opening is not timed."""
    splits: list[ShardedSplit] = []

    def fresh() -> None:
        splits.append(open_split())  # nothing open or verified yet
        if cold:
            evict(splits[-1].files)

    def read() -> None:
        split = splits[-1]
        split.read_range(0, len(split), out, threads=threads)

    first = open_split()
    out = np.empty((len(first), *first.sample_shape), first.x_dtype)
    out.fill(0)  # touch the pages: the timing is of reading, not of page faults
    first.close()
    best = _best(read, repeats, fresh)
    for s in splits:
        s.close()
    return best


def chunked_vs_contiguous(split: ShardedSplit, repeats: int, cold: bool) -> dict:
    """Our reader on the first shard as built vs on a contiguous-layout copy of the same rows (with one
    CRC-32C over all of x when the original has per-chunk ones, so both sides verify)."""
    entry = {
        "rows": int(split.offsets[1]),
        "shards": [{"file": split.files[0].name, "rows": int(split.offsets[1])}],
    }

    def opener(root: Path):
        return lambda: ShardedSplit(root, split.split, entry, split.sample_shape, str(split.x_dtype))

    nbytes = int(split.offsets[1]) * split.row_bytes
    with tempfile.TemporaryDirectory(dir=split.root.parent) as tmp:
        with h5py.File(split.files[0], "r") as src, h5py.File(Path(tmp) / split.files[0].name, "w") as dst:
            x = src["x"][:]
            dst.create_dataset("x", data=x)  # no chunks, no filters: HDF5's contiguous layout
            dy = dst.create_dataset("y", data=src["y"][:])
            if "x_crc32c" in src:
                dst.create_dataset("x_crc32c", data=np.array([crc32c(x)], np.uint32))
                dy.attrs["crc32c"] = src["y"].attrs["crc32c"]
        sequential_seconds(opener(Path(tmp)), 1)  # warm the copy's pages like the original's
        return {
            "shard": split.files[0].name,
            "chunked_GBps": nbytes / sequential_seconds(opener(split.root), repeats, cold) / 1e9,
            "contiguous_GBps": nbytes / sequential_seconds(opener(Path(tmp)), repeats, cold) / 1e9,
        }


class H5RowDataset:
    """The usual map-style torch Dataset over HDF5 shards: a row per __getitem__, files opened per worker."""

    def __init__(self, split: ShardedSplit, rdcc_nbytes: int):
        self.files, self.offsets, self.rdcc_nbytes = split.files, split.offsets, rdcc_nbytes
        self.handles: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        import torch

        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if s not in self.handles:
            self.handles[s] = h5py.File(self.files[s], "r", rdcc_nbytes=self.rdcc_nbytes)
        f, j = self.handles[s], i - int(self.offsets[s])
        return torch.from_numpy(f["x"][j]), int(f["y"][j])


def torch_samples_per_s(split: ShardedSplit, batch: int, workers: int, limit: int, rdcc_nbytes: int) -> float:
    import torch

    loader = torch.utils.data.DataLoader(
        H5RowDataset(split, rdcc_nbytes),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    n, t0 = 0, time.perf_counter()  # worker start-up counts, as our loader's cache fill does
    for x, _ in loader:
        n += len(x)
        if n >= limit or time.perf_counter() - t0 > MAX_S:  # per-row h5py reads can be slow: bound the time
            break
    return n / (time.perf_counter() - t0)


def ours_samples_per_s(
    root: Path, split_name: str, batch: int, readers: int, cache: bool, limit: int
) -> float:
    ds = ShardedDataset(root)  # fresh: nothing cached or open yet
    loader = BatchLoader(
        ds.splits[split_name],
        batch,
        0,
        1,
        seed=0,
        prefetch=4,
        readers=readers,
        cache_bytes=(1 << 40) if cache else 0,
    )
    n, t0 = 0, time.perf_counter()
    for x, _ in loader.epoch(0):
        n += len(x)
        if n >= limit or time.perf_counter() - t0 > MAX_S:
            break
    rate = n / (time.perf_counter() - t0)
    ds.close()
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpcai bench io", description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="a dataset built by `hpcai data build`")
    p.add_argument("--split", default="train")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--limit", type=int, default=20000, help="samples per loader measurement (at most an epoch)"
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    try:
        ds = ShardedDataset(args.dataset)
        if args.split not in ds.splits:
            raise UserError(f"{args.dataset}: no split {args.split!r} (has {', '.join(ds.splits)})")
    except UserError as e:
        sys.stderr.write(f"hpcai: error: {e}\n")
        return e.exit_code
    split = ds.splits[args.split]
    files = split.files
    disk_bytes = sum(f.stat().st_size for f in files)
    limit = min(args.limit, len(split) // args.batch * args.batch)
    res: dict = {
        "dataset": str(Path(args.dataset).resolve()),
        "split": args.split,
        "samples": len(split),
        "sample_bytes": split.row_bytes,
        "data_bytes": split.nbytes,
        "file_bytes": disk_bytes,
        "checksum": ds.manifest.get("checksum", "none"),
        "compression": ds.manifest.get("compression", "none"),
        "batch": args.batch,
        "cpus": os.cpu_count(),
    }
    ds.close()

    def open_split() -> ShardedSplit:
        return ShardedDataset(args.dataset).splits[args.split]

    # Cold page cache: the headline figures (what a training job's first epoch reads from disk).
    evict(files)
    res["resident_after_evict"] = resident_fraction(files)
    res["page_cache"] = "cold: every file evicted (posix_fadvise DONTNEED) before every pass of either side"
    # Interleaved, best of each: this disk's speed drifts by 1.5x between seconds (a virtual disk), so
    # both sides sample the same moments.
    raw_s, ours_s, one_s = [], [], []
    for _ in range(args.repeats):
        raw_s.append(raw_seconds(files, 1, cold=True))
        ours_s.append(sequential_seconds(open_split, 1, cold=True))
        one_s.append(sequential_seconds(open_split, 1, cold=True, threads=1))
    res["raw_GBps"] = disk_bytes / min(raw_s) / 1e9
    res["ours_GBps"] = split.nbytes / min(ours_s) / 1e9
    res["ours_vs_raw"] = res["ours_GBps"] / res["raw_GBps"]
    res["ours_1thread_GBps"] = split.nbytes / min(one_s) / 1e9
    res["cold_passes_GBps"] = {
        "raw": [disk_bytes / t / 1e9 for t in raw_s],
        "ours": [split.nbytes / t / 1e9 for t in ours_s],
    }
    res.update(chunked_vs_contiguous(split, args.repeats, cold=True))
    # Warm page cache: the files read once first (what later epochs of a dataset that fits in RAM see).
    raw_seconds(files, 1)
    res["raw_warm_GBps"] = disk_bytes / raw_seconds(files, args.repeats) / 1e9
    res["ours_warm_GBps"] = split.nbytes / sequential_seconds(open_split, args.repeats) / 1e9
    res["ours_vs_raw_warm"] = res["ours_warm_GBps"] / res["raw_warm_GBps"]
    res["ours_samples_per_s_by_readers"] = {
        r: ours_samples_per_s(Path(args.dataset), args.split, args.batch, r, True, limit) for r in (1, 2)
    }
    res["ours_samples_per_s"] = max(res["ours_samples_per_s_by_readers"].values())
    res["ours_uncached_samples_per_s"] = ours_samples_per_s(
        Path(args.dataset), args.split, args.batch, 2, False, limit
    )
    res["torch_dataloader_samples_per_s_by_workers"] = {
        f"workers={w},chunk_cache_MiB={c >> 20}": torch_samples_per_s(split, args.batch, w, limit, c)
        for w in (0, 1, 2)
        for c in (1 << 20, 64 << 20)  # h5py's default chunk cache, and one that holds most of a shard
    }
    res["torch_dataloader_samples_per_s"] = max(res["torch_dataloader_samples_per_s_by_workers"].values())
    res["loader_samples_measured"] = limit
    for key in (
        "raw_GBps",
        "ours_GBps",
        "ours_vs_raw",
        "ours_1thread_GBps",
        "chunked_GBps",
        "contiguous_GBps",
    ):
        print(f"{key + ' (cold cache)':34s} {res[key]:8.2f}")
    for key in ("raw_warm_GBps", "ours_warm_GBps", "ours_vs_raw_warm"):
        print(f"{key:34s} {res[key]:8.2f}")
    for key in ("ours_samples_per_s", "ours_uncached_samples_per_s", "torch_dataloader_samples_per_s"):
        print(f"{key:34s} {res[key]:8.0f}")
    resident = res["resident_after_evict"]
    print(
        f"({split.nbytes / 1e6:.0f} MB in {len(files)} shards, checksum {res['checksum']}; "
        f"resident after eviction: {'unknown' if resident is None else f'{100 * resident:.1f}%'})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
