"""The reader and BatchLoader: both read paths agree, once per epoch at 1-4 ranks, resume, transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpcai.data.etl import build_dataset
from hpcai.data.loader import BatchLoader
from hpcai.data.shards import ShardedDataset
from hpcai.data.transforms import Compose, Normalize, RandomCropFlip
from hpcai.errors import DatasetError


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """The same 500 images built twice: raw layout (no checksum) and Fletcher32 + lzf (the h5py path)."""
    tmp = tmp_path_factory.mktemp("loader")
    x = np.random.default_rng(0).integers(0, 255, (500, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp / "img.npz", x=x, y=np.arange(500) % 7)
    raw, h5 = tmp / "raw", tmp / "h5"
    build_dataset(str(tmp / "img.npz"), raw, shards=3, checksum="none", log=lambda *_: None)
    build_dataset(str(tmp / "img.npz"), h5, shards=3, compression="lzf", log=lambda *_: None)
    return raw, h5, x


def test_raw_and_h5py_paths_read_the_same_rows(pair) -> None:
    raw, h5, _ = pair
    a, b = ShardedDataset(raw).splits["train"], ShardedDataset(h5).splits["train"]
    assert a._open(0).offset is not None and b._open(0).offset is None  # one of each path
    idx = np.random.default_rng(2).permutation(len(a))[:150]
    for ra, rb in ((a.read(idx), b.read(idx)), (a.read_range(37, 333), b.read_range(37, 333))):
        np.testing.assert_array_equal(ra[0], rb[0])
        np.testing.assert_array_equal(ra[1], rb[1])
    cached = ShardedDataset(raw).splits["train"]
    assert cached.cache(1 << 30) and not ShardedDataset(raw).splits["train"].cache(100)
    np.testing.assert_array_equal(cached.read(idx)[0], a.read(idx)[0])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_every_sample_once_per_epoch_and_the_same_global_batches(pair, world: int, drop_last: bool) -> None:
    split = ShardedDataset(pair[0]).splits["train"]
    n, gb = len(split), 12 * world
    loaders = [
        BatchLoader(split, gb, r, world, 5, prefetch=3, readers=2, drop_last=drop_last) for r in range(world)
    ]
    per_rank = [[y.numpy() for _, y in ld.epoch(2)] for ld in loaders]
    idx = [list(ld.indices(2)) for ld in loaders]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == loaders[0].steps_per_epoch
    ids = np.concatenate([np.concatenate(b) for b in idx])
    if drop_last:
        assert len(np.unique(ids)) == len(ids) == n // gb * gb  # never twice
    else:
        assert set(ids.tolist()) == set(range(n)) and len(ids) == -(-n // gb) * gb  # all, padded
    labels = ShardedDataset(pair[0]).splits["train"].read(np.arange(n))[1]
    for r in range(world):
        np.testing.assert_array_equal(np.concatenate(per_rank[r]), labels[np.concatenate(idx[r])])
    one = list(BatchLoader(split, gb, 0, 1, 5, drop_last=drop_last).indices(2))
    for s in range(len(one)):  # step s is the same global batch whatever the rank count
        np.testing.assert_array_equal(np.concatenate([b[s] for b in idx]), one[s])


def test_resume_mid_epoch_repeats_batches_and_augmentation(pair) -> None:
    raw, _, _ = pair
    ds = ShardedDataset(raw)
    aug = Compose(RandomCropFlip(seed=1, pad=2), Normalize.from_manifest(ds.manifest))

    def run(world: int, rank: int, start: int) -> list[np.ndarray]:
        ld = BatchLoader(ds.splits["train"], 16, rank, world, 9, prefetch=2, transform=aug)
        return [x.numpy() for x, _ in ld.epoch(1, start_step=start)]

    full = run(2, 1, 0)
    np.testing.assert_array_equal(np.concatenate(run(2, 1, 7)), np.concatenate(full[7:]))
    # The augmentation of a sample depends on its place in the global batch, not on the rank count.
    solo = run(1, 0, 0)
    np.testing.assert_array_equal(full[3], solo[3][8:])
    assert full[3].dtype == np.float32 and abs(float(solo[0].mean())) < 1.0
    assert not np.array_equal(
        run(1, 0, 0)[0], BatchLoader(ds.splits["train"], 16, 0, 1, 9).epoch(1).__next__()[0]
    )


def test_corrupt_or_missing_shard_at_read_time_names_the_file(pair, tmp_path: Path) -> None:
    import shutil

    _, h5, _ = pair
    copy = tmp_path / "h5"
    shutil.copytree(h5, copy)
    shard = copy / "train-00001-of-00003.h5"
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 3, len(data) * 2 // 3, 97):  # scribble over the middle: data chunks
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    split = ShardedDataset(copy).splits["train"]
    loader = BatchLoader(split, 32, 0, 1, 0, prefetch=2, cache_bytes=0)
    with pytest.raises(DatasetError, match=f"{shard}"):
        for _ in loader.epoch(0):
            pass
    (copy / "train-00002-of-00003.h5").unlink()
    with pytest.raises(DatasetError, match="train-00002-of-00003.h5: cannot open shard"):
        ShardedDataset(copy).splits["train"].read(np.array([len(split) - 1]))


def test_crc32c_catches_a_flipped_byte_on_every_read_path(tmp_path: Path) -> None:
    """The default checksum: unfiltered data read like dd, each chunk checked against x_crc32c the first time
    it is read: sequential, scattered and cache reads fail naming the shard and rows; other chunks read."""
    x = np.random.default_rng(3).standard_normal((1500, 4, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(1500) % 5)
    build_dataset(str(tmp_path / "f.npz"), tmp_path / "ds", shards=2, test_fraction=0.1, log=lambda *_: None)
    clean = ShardedDataset(tmp_path / "ds").splits["train"]
    shard = clean._open(1)
    assert shard.offset is not None and shard.crc is not None and len(shard.crc) > 2  # raw path, checked
    k, bad_row = shard.chunk_rows, shard.chunk_rows + 3  # a row in shard 1's second chunk
    want_x, want_y = clean.read_range(0, len(clean))
    clean.close()
    path = clean.files[1]
    with open(path, "r+b") as f:
        f.seek(shard.offset + bad_row * shard.row_bytes + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))  # one bit
    split = lambda: ShardedDataset(tmp_path / "ds").splits["train"]  # noqa: E731 (fresh: nothing checked)
    first = int(split().offsets[1])
    message = f"{path}: rows {k}-{2 * k - 1} fail their CRC-32C"
    with pytest.raises(DatasetError, match=message):
        split().read_range(0, len(want_x))
    with pytest.raises(DatasetError, match=message):
        split().read(np.array([3, first + bad_row + 1]))  # scattered: the memory-map path
    with pytest.raises(DatasetError, match=message):
        split().cache(1 << 30)
    with pytest.raises(DatasetError, match=message):
        for _ in BatchLoader(split(), 40, 0, 1, 0, prefetch=2, readers=2, cache_bytes=0).epoch(0):
            pass
    ok = split()
    rows = np.r_[0:first, first : first + k, first + 2 * k : len(want_x)]  # every chunk but the bad one
    got_x, got_y = ok.read(rows)
    np.testing.assert_array_equal(got_x, want_x[rows])
    np.testing.assert_array_equal(got_y, want_y[rows])
