"""`hpcai data build` / `hpcai data info`: every source kind, a real 2-rank mpiexec build, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcai.data.etl import build_dataset
from hpcai.data.shards import ShardedDataset
from hpcai.errors import DatasetError
from tests.conftest import run_cli


def quiet(*_: object) -> None:
    pass


def make_npz(path: Path, n: int = 600, shape=(3, 6, 6), **over) -> Path:
    r = np.random.default_rng(0)
    arrays = {"x": r.standard_normal((n, *shape)).astype(np.float32), "y": r.integers(0, 4, n)}
    arrays.update(over)
    np.savez(path, **arrays)
    return path


def all_rows(ds: ShardedDataset) -> tuple[np.ndarray, np.ndarray]:
    parts = [s.read_range(0, len(s)) for s in ds.splits.values()]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_two_rank_mpiexec_build_equals_one_rank_build(tmp_path: Path) -> None:
    src = make_npz(tmp_path / "a.npz")
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--shards", "4", "--val-fraction", "0.1", "--checksum", "none"]
    p1 = run_cli("data", "build", str(src), "--out", str(one), *args, timeout=120)
    p2 = run_cli("data", "build", str(src), "--out", str(two), "-n", "2", *args, timeout=120)
    assert p1.returncode == 0 and p2.returncode == 0, p1.stderr + p2.stderr
    assert "built" in p2.stdout and p2.stdout.count("built") == 1  # rank 0 alone reports
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m2["built_with_ranks"] == 2
    for key in ("splits", "normalization", "sample_shape", "num_classes"):
        assert m1[key] == m2[key], key  # same bytes, same checksums, same statistics
    assert {k: v["rows"] for k, v in m2["splits"].items()} == {"train": 420, "test": 120, "val": 60}
    x = np.load(src)["x"]
    train = ShardedDataset(two).splits["train"].read_range(0, 420)[0]
    assert m2["normalization"]["mean"] == pytest.approx(float(train.astype(np.float64).mean()), abs=1e-9)
    assert m2["normalization"]["channel_std"][1] == pytest.approx(float(train[:, 1].astype(np.float64).std()))
    got = np.sort(all_rows(ShardedDataset(two))[0].reshape(600, -1), axis=0)
    np.testing.assert_array_equal(got, np.sort(x.reshape(600, -1), axis=0))  # every row once, unchanged
    info = run_cli("data", "info", str(two), "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["checksums_ok"] is True


def test_two_rank_failure_leaves_nothing(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((400, 5)).astype(np.float32)
    x[399, 2] = np.inf  # in the last shard: the rank that writes it fails, the other succeeds
    src = make_npz(tmp_path / "bad.npz", x=x, y=np.zeros(400, np.int64))
    proc = run_cli("data", "build", str(src), "--out", str(tmp_path / "out"), "-n", "2", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"hpcai: error: {src}: x has NaN or inf in row 399"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]  # no out, no temporary directory


def test_npy_dir_csv_and_images(tmp_path: Path) -> None:
    d = tmp_path / "npy"
    d.mkdir()
    r = np.random.default_rng(1)
    for split, n in (("train", 50), ("test", 20)):
        np.save(d / f"{split}_x.npy", r.integers(0, 255, (n, 4), dtype=np.uint8))
        np.save(d / f"{split}_y.npy", np.arange(n) % 3)
    build_dataset(str(d), tmp_path / "o1", shards=2, log=quiet)
    ds = ShardedDataset(tmp_path / "o1", verify=True)
    assert len(ds.splits["train"]) == 50 and len(ds.splits["test"]) == 20  # per-split files kept as given
    np.testing.assert_array_equal(ds.splits["test"].read_range(0, 20)[0], np.load(d / "test_x.npy"))

    csv = tmp_path / "t.csv"
    csv.write_text("a,species,b\n1.5,cat,2\n0,dog,1\n3,cat,-1\n4,bird,0\n5,dog,2\n")
    build_dataset(str(csv), tmp_path / "o2", shards=1, label_column="species", log=quiet)
    m = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert m["classes"] == ["bird", "cat", "dog"] and m["sample_shape"] == [2] and m["num_classes"] == 3

    from PIL import Image

    img = tmp_path / "img"
    for c, colour in (("circle", 40), ("square", 200)):
        (img / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (5, 4), (colour, i, 0)).save(img / c / f"{i}.png")
    build_dataset(str(img), tmp_path / "o3", shards=2, test_fraction=0.25, log=quiet)
    ds = ShardedDataset(tmp_path / "o3")
    m = ds.manifest
    assert m["sample_shape"] == [3, 4, 5] and m["x_dtype"] == "uint8" and m["classes"] == ["circle", "square"]
    x, y = all_rows(ds)
    assert sorted(x[:, 0, 0, 0].tolist()) == [40] * 6 + [200] * 6 and sorted(y.tolist()) == [0] * 6 + [1] * 6


def _bad_sources(tmp: Path) -> list[tuple[str, str]]:
    """(source path, expected message part) for every kind of bad input."""
    ragged = tmp / "ragged.npz"
    np.savez(ragged, x=np.array([[1.0, 2.0], [3.0]], dtype=object), y=np.array([0, 1]))
    img = tmp / "imgs"
    (img / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("L", (4, 4)).save(img / "a" / "0.png")
    (img / "a" / "1.png").write_bytes(b"not a png at all")
    sizes = tmp / "sizes"
    (sizes / "a").mkdir(parents=True)
    Image.new("L", (4, 4)).save(sizes / "a" / "0.png")
    Image.new("L", (5, 4)).save(sizes / "a" / "1.png")
    csv = tmp / "short.csv"
    csv.write_text("label,a,b\n0,1,2\n1,3\n")
    return [
        (str(make_npz(tmp / "len.npz", y=np.zeros(5, np.int64))), "x has 600 rows but y has 5"),
        (str(ragged), "ragged"),
        (
            str(make_npz(tmp / "nan.npz", x=np.full((10, 2), np.nan, np.float32), y=np.zeros(10, int))),
            "NaN or inf",
        ),
        (str(make_npz(tmp / "flt.npz", y=np.linspace(0, 1, 600))), "integer class labels"),
        (str(img), "1.png: cannot read image"),
        (str(sizes), "1.png: image is 5x4, the others 4x4"),
        (str(csv), "short.csv:3: 2 fields, the header has 3"),
        (str(tmp / "missing.npz"), "no such file"),
    ]


def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path: Path) -> None:
    for source, message in _bad_sources(tmp_path):
        out = tmp_path / "out"
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(DatasetError, match=message.replace("(", r"\(")):
            build_dataset(source, out, shards=2, log=quiet)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, source  # no temporary dir left
    # Through the CLI: one line on stderr, exit status 2, no traceback.
    proc = run_cli("data", "build", str(tmp_path / "len.npz"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "len.npz: x has 600 rows but y has 5" in proc.stderr


def test_existing_output_refused_unless_overwrite(tmp_path: Path) -> None:
    src = make_npz(tmp_path / "a.npz", n=100)
    build_dataset(str(src), tmp_path / "ds", shards=2, log=quiet)
    proc = run_cli("data", "build", str(src), "--out", str(tmp_path / "ds"))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    build_dataset(str(src), tmp_path / "ds", shards=3, overwrite=True, log=quiet)
    assert len(ShardedDataset(tmp_path / "ds").manifest["splits"]["train"]["shards"]) == 3
    (tmp_path / "notmine").mkdir()
    (tmp_path / "notmine" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="not a dataset"):
        build_dataset(str(src), tmp_path / "notmine", overwrite=True, log=quiet)
    assert (tmp_path / "notmine" / "thesis.tex").read_text() == "precious"


def test_info_reports_a_corrupt_or_missing_shard(tmp_path: Path) -> None:
    build_dataset(str(make_npz(tmp_path / "a.npz")), tmp_path / "ds", shards=2, compression="gzip", log=quiet)
    ok = run_cli("data", "info", str(tmp_path / "ds"))
    assert (
        ok.returncode == 0
        and "train: 480 samples in 2 shards" in ok.stdout
        and "all shards match" in ok.stdout
    )
    with h5py.File(tmp_path / "ds" / "train-00000-of-00002.h5") as f:
        assert f["x"].compression == "gzip" and "x_crc32c" in f and not f["x"].fletcher32
    shard = tmp_path / "ds" / "train-00001-of-00002.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run_cli("data", "info", str(tmp_path / "ds"))
    assert bad.returncode == 2 and f"{shard}: checksum mismatch" in bad.stderr
    (tmp_path / "ds" / "test-00000-of-00001.h5").unlink()
    bad = run_cli("data", "info", str(tmp_path / "ds"), "--json")
    assert bad.returncode == 2 and json.loads(bad.stdout)["checksums_ok"] is False
