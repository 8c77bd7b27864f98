"""Read a sharded HDF5 dataset (see :mod:`hpcai.data.etl` for the layout).

Rows are addressed by a global index within a split; a read of any set of rows touches only the shard files and
HDF5 chunks that hold them, so each rank reads its own part of a batch and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from hpcai.data.etl import sha256_file
from hpcai.errors import DatasetError


class ShardedSplit:
    """One split (train or test) of a dataset: its shard files opened lazily, read by global row index."""

    def __init__(self, root: Path, split: str, entry: dict, sample_shape: tuple[int, ...]):
        self.root, self.split = root, split
        self.files = [root / s["file"] for s in entry["shards"]]
        rows = np.array([s["rows"] for s in entry["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(rows)])  # shard i holds rows offsets[i]:offsets[i+1]
        self.rows = int(self.offsets[-1])
        self.sample_shape = sample_shape
        self._handles: dict[int, h5py.File] = {}
        if self.rows != entry["rows"]:
            raise DatasetError(f"{root}/manifest.json: splits.{split}.rows is {entry['rows']} but shards hold {self.rows}")

    def __len__(self) -> int:
        return self.rows

    def _open(self, i: int) -> h5py.File:
        if i not in self._handles:
            try:
                f = h5py.File(self.files[i], "r")
            except OSError as e:
                raise DatasetError(f"{self.files[i]}: cannot open shard: {e}") from None
            for key in ("x", "y"):
                if key not in f:
                    raise DatasetError(f"{self.files[i]}: dataset '{key}' missing")
            if f["x"].shape[1:] != self.sample_shape or len(f["x"]) != len(f["y"]):
                raise DatasetError(f"{self.files[i]}: x{f['x'].shape} / y{f['y'].shape} do not match the manifest")
            self._handles[i] = f
        return self._handles[i]

    def read(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``index`` (any order, no repeats) as (x, y), in the order asked."""
        index = np.asarray(index, dtype=np.int64)
        order = np.argsort(index, kind="stable")
        sorted_idx = index[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        xs, ys = [], []
        for i in np.unique(shard_of):
            local = sorted_idx[shard_of == i] - self.offsets[i]
            f = self._open(int(i))
            try:
                if len(local) == local[-1] - local[0] + 1:  # a run of rows: one contiguous slice
                    xs.append(f["x"][local[0] : local[-1] + 1])
                    ys.append(f["y"][local[0] : local[-1] + 1])
                else:  # h5py's fancy selection wants increasing indices, which sorting gave us
                    xs.append(f["x"][local])
                    ys.append(f["y"][local])
            except OSError as e:  # Fletcher32 mismatch or a truncated file
                raise DatasetError(f"{self.files[i]}: read failed (corrupt shard?): {e}") from None
        x = np.concatenate(xs) if xs else np.empty((0, *self.sample_shape), np.float32)
        y = np.concatenate(ys) if ys else np.empty((0,), np.int64)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return x[inverse], y[inverse]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class ShardedDataset:
    """A dataset directory: its manifest and its splits."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.root = Path(path)
        mpath = self.root / "manifest.json"
        try:
            self.manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise DatasetError(f"{mpath}: no dataset here (manifest.json missing)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{mpath}: not valid JSON: {e}") from None
        m = self.manifest
        for key in ("sample_shape", "num_classes", "splits"):
            if key not in m:
                raise DatasetError(f"{mpath}: key '{key}' missing")
        self.sample_shape = tuple(m["sample_shape"])
        self.num_classes = int(m["num_classes"])
        self.splits = {
            name: ShardedSplit(self.root, name, entry, self.sample_shape) for name, entry in m["splits"].items()
        }
        for name in ("train", "test"):
            if name not in self.splits:
                raise DatasetError(f"{mpath}: splits.{name} missing")
        if verify:
            self.verify()

    def verify(self) -> None:
        """Check every shard's SHA-256 against the manifest (reads every byte once)."""
        for name, entry in self.manifest["splits"].items():
            for s in entry["shards"]:
                f = self.root / s["file"]
                if not f.is_file():
                    raise DatasetError(f"{f}: shard missing")
                if "sha256" in s and sha256_file(f) != s["sha256"]:
                    raise DatasetError(f"{f}: checksum mismatch with manifest.json (corrupt or modified shard)")

    def close(self) -> None:
        for s in self.splits.values():
            s.close()
