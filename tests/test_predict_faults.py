"""`hpcai predict` under faults: checkpoints committed while ranks start, a full disk, a directory as --out.

The faults are placed deterministically by a small wrapper (``HOOK``, below) that runs the real CLI with one
function wrapped, instead of racing a training run: a newer checkpoint is committed (and the chosen one
rotated away) right after rank 0 chose, or the file system is filled right after the input was checked.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

import hpcai.predict
from hpcai import checkpoint as ckpt
from hpcai.cli import main as cli_main
from hpcai.launch import find_mpiexec
from tests.conftest import ROOT, cli_env, small_tmpfs
from tests.test_predict import make_run, reference

HOOK = r"""
import errno, os, sys, time
from pathlib import Path

rank = os.environ.get("PMI_RANK", "0")
if os.environ.get("HOOK_NEWER"):  # training commits a newer checkpoint right after rank 0 chose one
    from hpcai import checkpoint as ckpt

    chosen = ckpt.find_resumable
    flag = Path(os.environ["HOOK_NEWER"] + ".committed")

    def find_resumable(run_dir, warn=print):
        if rank != "0":  # another rank looks only once training moved on
            deadline = time.monotonic() + 60
            while not flag.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            return chosen(run_dir, warn)
        found = chosen(run_dir, warn)
        newer = ckpt.checkpoint_path(run_dir, 20)
        os.replace(os.environ["HOOK_NEWER"], newer)  # committed ...
        found[0].unlink()  # ... and the older one rotated away (checkpoint.keep = 1)
        flag.touch()
        return found

    ckpt.find_resumable = find_resumable
if os.environ.get("HOOK_FILL") and rank == "0":  # the disk fills up once the input was checked
    import hpcai.predict
    from tests.test_predict_faults import fill_disk

    checked = hpcai.predict.prepare

    def prepare(*args, **kwargs):
        p = checked(*args, **kwargs)
        fill_disk(Path(os.environ["HOOK_FILL"]), int(os.environ["HOOK_LEAVE"]))
        return p

    hpcai.predict.prepare = prepare
if os.environ.get("HOOK_NO_FALLOCATE"):  # a file system that cannot reserve space (the writes find out)

    def no_fallocate(*_a):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    os.posix_fallocate = no_fallocate
if os.environ.get("HOOK_TERM"):  # SIGTERM (scancel) while scoring, once the output file is laid out
    import signal

    import hpcai.predict

    def score(*_a, **_k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    hpcai.predict.score = score
from hpcai.cli import main

sys.exit(main(sys.argv[1:]))
"""


def fill_disk(ballast: Path, leave: int) -> None:
    """Fill the file system of ``ballast`` but ``leave`` bytes."""
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError:
            pass
        f.truncate(max(0, f.tell() - leave))


def hooked(tmp: Path, ranks: int, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """``hpcai ARGS`` through HOOK, on ``ranks`` ranks started by mpiexec (no MPI for 1)."""
    script = tmp / "hooked_cli.py"
    script.write_text(HOOK)
    cmd = [sys.executable, str(script), *args, "-n", str(ranks)]
    if ranks > 1:
        cmd = [find_mpiexec(), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=180)


def one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err, proc.stdout)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def temporaries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp" in p.name)


def test_every_rank_scores_with_the_checkpoint_rank_0_chose(tmp_path: Path, digits_dataset: Path) -> None:
    """A checkpoint committed (and the chosen one rotated away) between the ranks' starts: the output is
    all from one checkpoint, the one its attributes name (before: rows of rank 1 from the newer one)."""
    run_dir = make_run(tmp_path / "run", digits_dataset, step=10)
    make_run(tmp_path / "later", digits_dataset, step=20, seed=1)
    newer = tmp_path / "newer.h5"
    shutil.move(ckpt.checkpoint_path(tmp_path / "later", 20), newer)
    expected = reference(run_dir, digits_dataset)[0]  # step 10's logits, before it is rotated away
    out = tmp_path / "preds.h5"
    args = ["predict", str(run_dir), "--data", str(digits_dataset), "--out", str(out), "--logits"]
    proc = hooked(tmp_path, 2, args, HOOK_NEWER=str(newer))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000020.h5"]  # the hook did run
    with h5py.File(out, "r") as f:
        assert f.attrs["step"] == 10 and f.attrs["checkpoint"].endswith("step-00000010.h5")
        np.testing.assert_allclose(f["logits"][:], expected, rtol=1e-5, atol=1e-5)  # every row
        assert np.array_equal(f["predictions"][:], expected.argmax(1))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, digits_dataset: Path) -> Path:
    return make_run(tmp_path_factory.mktemp("faults") / "run", digits_dataset)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs under tmp_path."""
    with small_tmpfs(tmp_path / "small", "256k") as d:
        yield d


def test_output_that_cannot_fit_is_refused_before_writing(
    small_fs: Path, trained_run: Path, digits_dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    """The train split with logits and probabilities needs ~150 KB; 100 KB are free: one line, exit 2,
    nothing written, the existing output untouched (before: a segmentation fault, exit 139)."""
    (small_fs / "other").write_bytes(bytes(156 << 10))
    out = small_fs / "preds.h5"
    out.write_text("precious")
    args = ["predict", str(trained_run), "--data", str(digits_dataset), "--out", str(out), "--split", "train"]
    assert cli_main([*args, "--logits", "--probabilities", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: no space left" in err and "Traceback" not in err, err
    assert out.read_text() == "precious" and temporaries(small_fs) == []


@pytest.mark.parametrize("ranks", [1, 2])
def test_disk_filling_up_while_writing_is_one_line(
    small_fs: Path,
    trained_run: Path,
    digits_dataset: Path,
    ranks: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """The disk fills up after the checks passed (16 KB left): one line, exit 2, no temporary left, the old
    output untouched. One process: the space reservation fails; 2 ranks on a file system that cannot
    reserve space: the writes of the rows fail (before: a segmentation fault, exit 139 / 11)."""
    out = small_fs / "preds.h5"
    out.write_text("precious")
    args = ["predict", str(trained_run), "--data", str(digits_dataset), "--out", str(out), "--overwrite"]
    args += ["--logits", "--probabilities"]
    ballast, leave = small_fs / "ballast", 16 << 10
    if ranks == 1:  # in this process: the same hook, by monkeypatch
        checked = hpcai.predict.prepare

        def prepare(a: argparse.Namespace) -> hpcai.predict.Prepared:
            p = checked(a)
            fill_disk(ballast, leave)
            return p

        monkeypatch.setattr(hpcai.predict, "prepare", prepare)
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{out}: no space left" in err and "Traceback" not in err, err
    else:
        env = {"HOOK_FILL": str(ballast), "HOOK_LEAVE": str(leave), "HOOK_NO_FALLOCATE": "1"}
        one_line(hooked(small_fs.parent, ranks, args, **env), f"{out}: no space left")
    assert out.read_text() == "precious" and temporaries(small_fs) == []


def test_out_naming_a_directory_is_refused(
    tmp_path: Path, trained_run: Path, digits_dataset: Path, capsys: pytest.CaptureFixture
) -> None:
    """--out EXISTING_DIR --overwrite (before: a traceback from os.replace): one line, the directory kept."""
    d = tmp_path / "results"
    d.mkdir()
    (d / "mine.txt").write_text("keep")
    args = ["predict", str(trained_run), "--data", str(digits_dataset), "--out", str(d)]
    for extra in (["--overwrite"], []):
        assert cli_main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a directory" in err and "Traceback" not in err, err
    assert sorted(os.listdir(d)) == ["mine.txt"] and (d / "mine.txt").read_text() == "keep"
    assert temporaries(tmp_path) == []


def test_sigterm_removes_the_temporary(tmp_path: Path, trained_run: Path, digits_dataset: Path) -> None:
    """SIGTERM while scoring (the output file already laid out): the process ends as SIGTERM ends it,
    the temporary file removed first and the old output kept (before: the temporary was left)."""
    out = tmp_path / "preds.h5"
    out.write_text("precious")
    args = ["predict", str(trained_run), "--data", str(digits_dataset), "--out", str(out), "--overwrite"]
    proc = hooked(tmp_path, 1, args, HOOK_TERM="1")
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert out.read_text() == "precious" and temporaries(tmp_path) == []
