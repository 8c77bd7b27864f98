"""Sharded HDF5 datasets: the ETL output, reading by row, and how batches split across ranks."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcai.data.etl import build_dataset, load_digits_arrays, split_indices
from hpcai.data.loader import BatchLoader
from hpcai.data.shards import ShardedDataset
from hpcai.errors import DatasetError


def test_manifest_and_shards_match_the_source(digits_dataset: Path) -> None:
    m = json.loads((digits_dataset / "manifest.json").read_text())
    assert m["splits"]["train"]["rows"] + m["splits"]["test"]["rows"] == 1797
    assert len(m["splits"]["train"]["shards"]) == 4 and m["sample_shape"] == [1, 8, 8]
    x, y = load_digits_arrays()
    train_idx, test_idx = split_indices(len(x), 0.2, 0)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    ds = ShardedDataset(digits_dataset, verify=True)
    rows = np.random.default_rng(1).permutation(len(train_idx))[:100]
    got_x, got_y = ds.splits["train"].read(rows)
    np.testing.assert_array_equal(got_x, x[train_idx][rows])
    np.testing.assert_array_equal(got_y, y[train_idx][rows])
    with h5py.File(digits_dataset / m["splits"]["test"]["shards"][0]["file"]) as f:
        # default checksum "crc32c": unfiltered chunks (the reader's raw path) and one CRC-32C per chunk
        assert not f["x"].fletcher32 and f["x"].chunks is not None
        assert len(f["x_crc32c"]) == -(-len(f["x"]) // f["x"].chunks[0]) and "crc32c" in f["y"].attrs


def test_refuses_to_overwrite(digits_dataset: Path) -> None:
    with pytest.raises(DatasetError, match="already exists"):
        build_dataset("digits", digits_dataset)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_sample_once_per_epoch_across_ranks(digits_dataset: Path, world: int) -> None:
    split = ShardedDataset(digits_dataset).splits["train"]
    global_batch = 63 if world == 3 else 12 * world
    per_rank = [
        list(BatchLoader(split, global_batch, r, world, seed=7, prefetch=0).indices(3)) for r in range(world)
    ]
    steps = len(split) // global_batch
    assert all(len(batches) == steps for batches in per_rank)  # every rank takes the same number of steps
    ids = np.concatenate([np.concatenate(batches) for batches in per_rank])
    assert len(ids) == steps * global_batch and len(np.unique(ids)) == len(ids)  # none twice, drop-last only
    assert ids.min() >= 0 and ids.max() < len(split)
    # Step s of the epoch is the same global batch whatever the rank count (what elastic resume relies on).
    one = list(BatchLoader(split, global_batch, 0, 1, seed=7, prefetch=0).indices(3))
    for s in range(steps):
        np.testing.assert_array_equal(np.concatenate([b[s] for b in per_rank]), one[s])
    # And the epochs differ.
    assert not np.array_equal(one[0], next(BatchLoader(split, global_batch, 0, 1, seed=7).indices(4)))


def test_prefetch_gives_the_same_batches_and_resumes_mid_epoch(digits_dataset: Path) -> None:
    split = ShardedDataset(digits_dataset).splits["train"]
    inline = [y.numpy() for _, y in BatchLoader(split, 32, 1, 2, seed=3, prefetch=0).epoch(1)]
    ahead = [y.numpy() for _, y in BatchLoader(split, 32, 1, 2, seed=3, prefetch=3).epoch(1)]
    assert len(inline) == len(ahead) == len(split) // 32
    for a, b in zip(inline, ahead, strict=True):
        np.testing.assert_array_equal(a, b)
    tail = [y.numpy() for _, y in BatchLoader(split, 32, 1, 2, seed=3, prefetch=2).epoch(1, start_step=5)]
    assert len(tail) == len(inline) - 5
    np.testing.assert_array_equal(np.concatenate(tail), np.concatenate(inline[5:]))


def test_corrupt_shard_is_reported(digits_dataset: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "digits"
    shutil.copytree(digits_dataset, copy)
    shard = copy / "train-00001-of-00004.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="checksum mismatch"):
        ShardedDataset(copy, verify=True)
    with pytest.raises(DatasetError, match="manifest.json missing"):
        ShardedDataset(tmp_path / "nothing")
