"""Datasets under attack: damaged manifests, hostile sources, a full disk, signals and concurrent builds.

Each case is one line and exit status 2 (or 128 + the signal), with no temporary file left and nothing older
damaged. Subprocesses run the CLI as a user would, under timeouts; the concurrent-build test repeats
``HPCAI_RACE_LOOPS`` times (1 in the suite; 20 to look for a race).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from hpcai.cli import main as cli_main
from hpcai.data.etl import build_dataset
from hpcai.data.loader import BatchLoader
from hpcai.data.manifest import MAX_CLASSES
from hpcai.data.publish import lock_output
from hpcai.data.shards import ShardedDataset
from hpcai.errors import DatasetError
from hpcai.fsio import NoSpaceError
from tests.conftest import ROOT, cli_env, run_cli, small_tmpfs

RACE_LOOPS = int(os.environ.get("HPCAI_RACE_LOOPS", "1"))


def quiet(*_: object) -> None:
    pass


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcai: error: "), stderr
    return lines[0]


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------ manifest

DAMAGE = {
    "misspelt key": (lambda m: m.__setitem__("num_clases", m.pop("num_classes")), "num_clases: unknown key"),
    "num_classes ten": (lambda m: m.__setitem__("num_classes", "ten"), "num_classes: must be an integer"),
    "num_classes 1e9": (
        lambda m: m.__setitem__("num_classes", 10**9),
        f"num_classes: must be 1..{MAX_CLASSES:,}",
    ),
    "sample_shape abc": (
        lambda m: m.__setitem__("sample_shape", "abc"),
        "sample_shape: must be a list of integers",
    ),
    "x_dtype object": (lambda m: m.__setitem__("x_dtype", "object"), "x_dtype: must be one of"),
    "splits []": (lambda m: m.__setitem__("splits", []), "splits: must be an object"),
    "shards missing": (lambda m: m["splits"]["train"].pop("shards"), "splits.train.shards: missing"),
    "shard outside": (
        lambda m: m["splits"]["test"]["shards"][0].__setitem__("file", "../x.h5"),
        "splits.test.shards[0].file: must be a file name in the dataset directory",
    ),
    "not an object": (None, "must hold a JSON object, got list"),
}


def damaged_copy(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    if damage is None:
        m = [m]
    else:
        damage(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_manifest_is_one_line_naming_file_and_key(
    digits_dataset: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture
) -> None:
    damage, message = DAMAGE[case]
    d = damaged_copy(digits_dataset, tmp_path / "ds", damage)
    with pytest.raises(DatasetError, match=f"^{d / 'manifest.json'}: {message}".replace("[", r"\[")):
        ShardedDataset(d)
    assert cli_main(["data", "info", str(d)]) == 2
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "num_classes",
            5,
            "labels 0..9 outside 0..4 (num_classes in manifest.json)",
        ),  # was IndexError in the loss
        (
            "x_dtype",
            "float64",
            "x holds float32, manifest.json says float64",
        ),  # was "truncated (short read...)"
    ],
)
def test_a_manifest_that_disagrees_with_its_shards_names_the_shard(
    digits_dataset: Path, tmp_path: Path, key: str, value: object, message: str
) -> None:
    d = damaged_copy(digits_dataset, tmp_path / "ds", lambda m: m.__setitem__(key, value))
    split = ShardedDataset(d).splits["train"]
    with pytest.raises(
        DatasetError, match=f"{split.files[0]}: {message}".replace("(", r"\(").replace(")", r"\)")
    ):
        split.read(np.arange(4))


def test_a_batch_larger_than_the_data_is_one_line_exit_2(digits_dataset: Path, tmp_path: Path) -> None:
    train = ShardedDataset(digits_dataset).splits["train"]
    message = f"train.batch_size: global batch 4096 is larger than the train split of {digits_dataset}"
    with pytest.raises(DatasetError, match=f"{message} \\({len(train)} samples\\)"):
        BatchLoader(train, 4096, 0, 1, 0)
    with pytest.raises(DatasetError, match="train.batch_size"):
        BatchLoader(train, 2 * len(train), 1, 2, 0)  # a rank's share would be short as well
    assert BatchLoader(train, len(train), 0, 1, 0).steps_per_epoch == 1
    proc = run_cli(
        "run", "jobs/digits.toml", "-n", "1", "--set", f"data.path={digits_dataset}",
        "--set", "train.batch_size=4096", "--run-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr  # was 1, with a ValueError
    assert message in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ sources


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h grey pixels (and holds almost none): what a decompression bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_hostile_sources_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    r = np.random.default_rng(0)
    cases = []
    for name, (w, h) in {"huge": (30000, 30000), "big": (10000, 10000)}.items():
        d = tmp_path / name
        (d / "a").mkdir(parents=True)
        (d / "a" / "0.png").write_bytes(png_header(w, h))
        cases.append((d, f"{d / 'a' / '0.png'}: "))
    later = tmp_path / "later"  # a small first image, then a bomb: refused from its header, not decoded
    (later / "a").mkdir(parents=True)
    Image.new("L", (4, 4)).save(later / "a" / "0.png")
    (later / "a" / "1.png").write_bytes(png_header(10000, 10000))
    cases.append(
        (later, f"{later / 'a' / '1.png'}: image is 10000x10000 = 100,000,000 pixels, over the limit")
    )
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=r.standard_normal((100, 4)).astype(np.float32), y=np.r_[np.zeros(99, int), 10**9])
    cases.append((labels, f"{labels}: y has label 1,000,000,000 in row 99: labels must be class ids"))
    one = tmp_path / "one.npz"
    np.savez(one, x=np.zeros((1, 4), np.float32), y=np.zeros(1, np.int64))
    cases.append((one, f"{one}: 1 sample cannot make a training split and a test split"))
    cases.append(("synthetic-images:classes=2000000", "classes must be at most 1,048,576"))
    for source, message in cases:
        with pytest.raises(DatasetError, match=str(message).replace("(", r"\(")):
            build_dataset(str(source), tmp_path / "out", shards=2, log=quiet)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [], source
    assert cli_main(["data", "build", str(one), "--out", str(tmp_path / "out")]) == 2
    assert "1 sample cannot make" in one_error_line(capsys.readouterr().err)
    two = tmp_path / "two.npz"  # the smallest source that splits: one training sample, one test sample
    np.savez(two, x=np.arange(2, dtype=np.float32), y=np.arange(2))  # scalar samples: sample_shape []
    ds = ShardedDataset(build_dataset(str(two), tmp_path / "out", log=quiet))
    assert (len(ds.splits["train"]), len(ds.splits["test"]), ds.num_classes, ds.sample_shape) == (1, 1, 2, ())


# ------------------------------------------------------------------------------------------------ concurrency


def test_a_second_build_of_one_out_is_refused_or_waits(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    lock = lock_output(out)  # as a build in progress holds it
    try:
        with pytest.raises(DatasetError, match=f"another hpcai data build \\(pid {os.getpid()} on host"):
            build_dataset("synthetic-images:n=64,size=8", out, log=quiet, wait=False)
        assert not out.exists()
        # By default (the worker's automatic build) it waits for the other build, then uses what it built.
        lines: list[str] = []
        t = threading.Thread(
            target=build_dataset, args=("synthetic-tokens:n=64", out), kwargs={"log": lines.append}
        )
        t.start()
        build_dataset("synthetic-images:n=64,size=8", tmp_path / "theirs", log=quiet)
        os.rename(tmp_path / "theirs", out)  # what the build holding the lock publishes
        deadline = time.monotonic() + 60
        while not any("waiting for it" in m for m in lines) and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # until the thread waits on the lock (no timing is asserted)
    finally:
        lock.release()
    t.join(timeout=60)
    assert not t.is_alive() and "built meanwhile by another process: using it" in lines[-1], lines
    assert ShardedDataset(out).manifest["source"] == "synthetic-images:n=64,size=8"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("loop", range(RACE_LOOPS))
def test_two_builds_to_one_out_never_both_claim_success(tmp_path: Path, overwrite: bool, loop: int) -> None:
    out = tmp_path / "ds"
    if overwrite:
        build_dataset("synthetic-images:n=64,size=8", out, log=quiet)
    sources = ["synthetic-images:n=1500,seed=1", "synthetic-images:n=1600,seed=2"]
    extra = ["--overwrite"] if overwrite else []
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hpcai", "data", "build", s, "--out", str(out), *extra],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for s in sources
    ]
    results = [(p.wait(timeout=180), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    winners = [s for s, (rc, so, _) in zip(sources, results, strict=True) if rc == 0 and "built" in so]
    for rc, so, se in results:
        assert rc in (0, 2), se
        if rc == 2:
            line = one_error_line(se)
            assert "another hpcai data build" in line or "already exists" in line, line
            assert "built" not in so
    if not overwrite:
        assert len(winners) == 1, results  # exactly one wins
    assert winners, results  # with --overwrite both may win, one after the other
    ds = ShardedDataset(out, verify=True)  # complete, never a mix of the two
    assert ds.manifest["source"] in winners
    n = int(ds.manifest["source"].split("n=")[1].split(",")[0])
    assert sum(len(s) for s in ds.splits.values()) == n
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ full disk


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 512 KiB tmpfs: a full file system on demand."""
    with small_tmpfs(tmp_path / "fs", "512k") as d:
        yield d


def test_full_disk_is_one_line_and_leaves_the_old_dataset_intact(small_fs: Path) -> None:
    out = small_fs / "ds"
    big = "synthetic-images:n=512,size=16"  # ~1.6 MB of float32 noise: does not fit, nor compresses to fit
    with pytest.raises(NoSpaceError, match=f"{out}: no space left on device: the dataset needs about"):
        build_dataset(big, out, log=quiet)  # uncompressed: refused before anything is written
    assert list(small_fs.iterdir()) == []
    for ranks in ("1", "2"):  # compressed: the size is unknown beforehand, so the write itself fails
        argv = ["data", "build", big, "--out", str(out), "--compression", "gzip", "-n", ranks]
        proc = run_cli(*argv, timeout=120)
        assert proc.returncode == 2, (ranks, proc.returncode, proc.stderr)  # was 139, a segfault
        assert f"{out}: no space left on device (writing " in one_error_line(proc.stderr)
        assert list(small_fs.iterdir()) == []
    build_dataset("synthetic-images:n=64,size=8", out, log=quiet)
    before = (out / "manifest.json").read_text()
    proc = run_cli(
        "data", "build", big, "--out", str(out), "--overwrite", "--compression", "lzf", timeout=120
    )
    assert proc.returncode == 2 and "no space left on device" in one_error_line(proc.stderr)
    assert [p.name for p in small_fs.iterdir()] == ["ds"]
    assert (out / "manifest.json").read_text() == before
    ShardedDataset(out, verify=True)


# ------------------------------------------------------------------------------------------------ signals


def _signal_mid_build(tmp_path: Path, sig: signal.Signals, ranks: str) -> subprocess.CompletedProcess:
    out = tmp_path / "ds"
    argv = ["data", "build", "synthetic-images:n=4000", "--out", str(out), "-n", ranks]
    p = subprocess.Popen(
        [sys.executable, "-m", "hpcai", *argv],
        cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".ds.tmp-*/*.h5")) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
        p.send_signal(sig)  # mid-build: its first shard is being written
        so, se = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return subprocess.CompletedProcess(p.args, p.returncode, so, se)


@pytest.mark.parametrize(
    ("sig", "ranks"), [(signal.SIGTERM, "1"), (signal.SIGINT, "1"), (signal.SIGTERM, "2")]
)
def test_a_signal_stops_a_build_with_nothing_left(tmp_path: Path, sig: signal.Signals, ranks: str) -> None:
    proc = _signal_mid_build(tmp_path, sig, ranks)
    assert proc.returncode == 128 + sig, (proc.returncode, proc.stderr)  # was -15: killed, no cleanup
    line = one_error_line(proc.stderr)
    assert f"{tmp_path / 'ds'}: build stopped by {sig.name}" in line
    assert list(tmp_path.iterdir()) == []


INJECT = {
    # an exception inside the I/O call HDF5 makes into our file object
    "raise in pwrite": """
real, calls = os.pwrite, [0]
def pwrite(*a):
    calls[0] += 1
    if calls[0] == 3:
        raise KeyboardInterrupt
    return real(*a)
os.pwrite = pwrite
""",
    # a signal whose handler Python runs as a callback returns into HDF5 (was: SystemError, exit 1)
    "signal in seek": """
from hpcai.data.h5write import _NeverFailingFile
real, calls = _NeverFailingFile.seek, [0]
def seek(self, *a):
    calls[0] += 1
    if calls[0] == 5:
        signal.raise_signal(signal.SIGINT)
    return real(self, *a)
_NeverFailingFile.seek = seek
""",
    # a signal while h5py holds a file access property list that points at our file object (was: a
    # segfault at exit, HDF5 freeing it after Python had gone)
    "signal in make_fapl": """
import h5py._hl.files as files
real = files.make_fapl
def make_fapl(*a, **k):
    plist = real(*a, **k)
    signal.raise_signal(signal.SIGINT)
    return plist
files.make_fapl = make_fapl
""",
}


@pytest.mark.parametrize("inject", list(INJECT))
def test_an_interrupt_during_hdf5_io_is_raised_after_a_clean_close(tmp_path: Path, inject: str) -> None:
    """A signal handler may run (and raise) while HDF5 is calling back into Python: the build must remove
    its files and re-raise, outside HDF5, and the process must end normally (no SystemError, no crash)."""
    script = f"""
import os, signal, sys
from pathlib import Path
from hpcai.data.etl import build_dataset
{INJECT[inject]}
try:
    build_dataset("synthetic-images:n=600", Path({str(tmp_path)!r}) / "ds", log=lambda *_: None)
except KeyboardInterrupt:
    print("KeyboardInterrupt", sorted(os.listdir({str(tmp_path)!r})))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr  # -11 when HDF5 crashed at exit
    assert proc.stdout.strip() == "KeyboardInterrupt []", proc.stdout + proc.stderr
