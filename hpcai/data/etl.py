"""Build sharded HDF5 datasets.

Layout of a dataset directory (readable with h5py or h5dump alone)::

    DIR/manifest.json              counts, shapes, dtypes, splits, per-shard SHA-256, normalisation stats
    DIR/train-00000-of-00004.h5    datasets x (N, *shape) and y (N,), chunked by rows
    DIR/test-00000-of-00001.h5

The directory is built under a temporary name beside DIR and renamed into place when complete, so a crash
never leaves a half-built dataset that looks valid. Run it on its own with::

    python -m hpcai.data.etl digits data/digits
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from hpcai.errors import DatasetError

FORMAT_VERSION = 1


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


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation cut into (train, test) index arrays, each sorted to keep file order stable."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def write_split(out: Path, split: str, x: np.ndarray, y: np.ndarray, shards: int) -> list[dict]:
    """Write one split as ``shards`` files of near-equal row counts; return their manifest entries."""
    entries = []
    bounds = np.linspace(0, len(x), min(shards, max(1, len(x))) + 1).astype(int)
    n_files = len(bounds) - 1
    for i in range(n_files):
        lo, hi = bounds[i], bounds[i + 1]
        name = f"{split}-{i:05d}-of-{n_files:05d}.h5"
        with h5py.File(out / name, "w") as f:
            # Chunks of ~64 KiB of rows: a batch read touches few chunks, and the Fletcher32 filter checks
            # every chunk on read.
            row_bytes = max(1, int(np.prod(x.shape[1:])) * x.dtype.itemsize)
            rows = int(max(1, min(hi - lo, (64 << 10) // row_bytes)))
            f.create_dataset("x", data=x[lo:hi], chunks=(rows, *x.shape[1:]), fletcher32=True)
            f.create_dataset("y", data=y[lo:hi], chunks=(rows,), fletcher32=True)
            f.attrs["split"] = split
            f.attrs["first_row"] = int(lo)
        entries.append({"file": name, "rows": int(hi - lo), "sha256": sha256_file(out / name)})
    return entries


def build_dataset(
    source: str,
    out: str | Path,
    shards: int = 4,
    test_fraction: float = 0.2,
    seed: int = 0,
    log=print,
) -> Path:
    """Build ``source`` ('digits') into a sharded dataset at ``out``; refuse to overwrite one."""
    out = Path(out)
    if out.exists():
        raise DatasetError(f"{out}: already exists; remove it or choose another --out")
    if source != "digits":
        raise DatasetError(f"{source}: unknown source (supported: digits)")
    t0 = time.perf_counter()
    x, y = load_digits_arrays()
    train_idx, test_idx = split_indices(len(x), test_fraction, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = {
            "format": "hpcai-sharded-hdf5",
            "version": FORMAT_VERSION,
            "source": source,
            "sample_shape": list(x.shape[1:]),
            "x_dtype": str(x.dtype),
            "y_dtype": str(y.dtype),
            "num_classes": int(y.max()) + 1,
            "split_seed": seed,
            "test_fraction": test_fraction,
            # Statistics of the training split only, so the test split stays unseen.
            "normalization": {"mean": float(x[train_idx].mean()), "std": float(x[train_idx].std())},
            "splits": {},
        }
        for split, idx in (("train", train_idx), ("test", test_idx)):
            n_shards = shards if split == "train" else max(1, shards // 4)
            files = write_split(tmp, split, x[idx], y[idx], n_shards)
            manifest["splits"][split] = {"rows": int(len(idx)), "shards": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(tmp, out)  # atomic; fails if another process built a non-empty `out` meanwhile
        except OSError:
            if not (out / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # theirs is complete: keep it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = len(x)
    log(f"built {out}: {n} samples ({len(train_idx)} train, {len(test_idx)} test) in {time.perf_counter() - t0:.2f} s")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m hpcai.data.etl digits OUT_DIR")
    build_dataset(sys.argv[1], sys.argv[2])
