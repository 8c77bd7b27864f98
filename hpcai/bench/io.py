"""``hpcai bench io``: our reader and loader against the raw bytes and torch's DataLoader, side by side.

    python -c "import numpy as np; r = np.random.default_rng(0); np.savez('/tmp/io.npz', \\
        x=r.standard_normal((40000, 3, 32, 32), dtype=np.float32), y=r.integers(0, 10, 40000))"   # 492 MB
    hpcai data build /tmp/io.npz --out /tmp/io-none -n 2 --shards 8 --checksum none
    hpcai bench io /tmp/io-none --json io.json
    python -m hpcai.bench.io /tmp/io-none              # the same

Measured, each the best of ``--repeats`` passes, all with a **warm page cache** (the files are read once
first; containers seldom allow dropping caches, so both sides get the same warm cache, not one a cold one):

- raw_GBps: ``dd bs=4M of=/dev/null`` over the split's shard files (the bytes on disk, headers included).
- ours_GBps: :meth:`ShardedSplit.read_range` reading the split start to end in ~4 MiB blocks into one buffer.
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

from hpcai.data.loader import BatchLoader
from hpcai.data.shards import ShardedDataset, ShardedSplit
from hpcai.errors import UserError

MAX_S = 4.0  # a loader measurement stops after this long (rates are still samples / seconds)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def raw_seconds(files: list[Path], repeats: int) -> float:
    def dd() -> float:
        # dd's own timing (its "copied, S s" line): process start-up is not read bandwidth.
        total = 0.0
        for f in files:
            p = subprocess.run(
                ["dd", f"if={f}", "of=/dev/null", "bs=4M"], check=True, capture_output=True, text=True
            )
            total += float(p.stderr.strip().splitlines()[-1].split(",")[-2].split()[0])
        return total

    return min(dd() for _ in range(repeats))


def sequential_seconds(split: ShardedSplit, repeats: int) -> float:
    rows = max(1, (4 << 20) // split.row_bytes)
    buf = np.empty((rows, *split.sample_shape), split.x_dtype)

    def read() -> None:
        for lo in range(0, len(split), rows):
            hi = min(len(split), lo + rows)
            split.read_range(lo, hi, buf[: hi - lo])

    return _best(read, repeats)


def chunked_vs_contiguous(split: ShardedSplit, repeats: int) -> dict:
    """Our reader on the first shard as built vs on a contiguous-layout copy of the same rows."""
    entry = {
        "rows": int(split.offsets[1]),
        "shards": [{"file": split.files[0].name, "rows": int(split.offsets[1])}],
    }
    chunked = ShardedSplit(split.root, split.split, entry, split.sample_shape, str(split.x_dtype))
    with tempfile.TemporaryDirectory(dir=split.root.parent) as tmp:
        with h5py.File(split.files[0], "r") as src, h5py.File(Path(tmp) / split.files[0].name, "w") as dst:
            dst.create_dataset("x", data=src["x"][:])  # no chunks, no filters: HDF5's contiguous layout
            dst.create_dataset("y", data=src["y"][:])
        contiguous = ShardedSplit(Path(tmp), split.split, entry, split.sample_shape, str(split.x_dtype))
        nbytes = chunked.nbytes
        sequential_seconds(contiguous, 1)  # warm the copy's pages like the original's
        out = {
            "shard": split.files[0].name,
            "chunked_GBps": nbytes / sequential_seconds(chunked, repeats) / 1e9,
            "contiguous_GBps": nbytes / sequential_seconds(contiguous, repeats) / 1e9,
        }
        contiguous.close()
    chunked.close()
    return out


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
    p.add_argument("--repeats", type=int, default=3)
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
    raw_seconds(files, 1)  # warm the page cache for both sides
    res: dict = {
        "dataset": str(Path(args.dataset).resolve()),
        "split": args.split,
        "samples": len(split),
        "sample_bytes": split.row_bytes,
        "data_bytes": split.nbytes,
        "file_bytes": disk_bytes,
        "checksum": ds.manifest.get("checksum", "fletcher32"),
        "compression": ds.manifest.get("compression", "none"),
        "page_cache": "warm for all (files read once before timing)",
        "batch": args.batch,
        "cpus": os.cpu_count(),
    }
    res["raw_GBps"] = disk_bytes / raw_seconds(files, args.repeats) / 1e9
    res["ours_GBps"] = split.nbytes / sequential_seconds(split, args.repeats) / 1e9
    res["ours_vs_raw"] = res["ours_GBps"] / res["raw_GBps"]
    res.update(chunked_vs_contiguous(split, args.repeats))
    ds.close()
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
    for key in ("raw_GBps", "ours_GBps", "chunked_GBps", "contiguous_GBps"):
        print(f"{key:34s} {res[key]:8.2f}")
    print(f"{'ours_vs_raw':34s} {res['ours_vs_raw']:8.2f}")
    for key in ("ours_samples_per_s", "ours_uncached_samples_per_s", "torch_dataloader_samples_per_s"):
        print(f"{key:34s} {res[key]:8.0f}")
    print(
        f"(warm page cache; {split.nbytes / 1e6:.0f} MB in {len(files)} shards, checksum {res['checksum']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
