"""One run per run directory: the flock, the refusals, the launch file, stale temporaries, -n bounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcai.errors import UserError
from hpcai.rundir import LOCK_NAME, RunDirError, acquire, check_run_dir
from tests.conftest import ROOT, cli_env, fill_disk, run_cli, small_tmpfs


def _digits(ds: Path) -> list[str]:
    return ["--set", f"data.path={json.dumps(str(ds))}"]


def _start_run(run_dir: Path, ds: Path, lr: float, steps: int = 40) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hpcai", "run", "jobs/digits.toml", "-n", "1", "--run-dir", str(run_dir)]
    cmd += [*_digits(ds), "--set", f"train.lr={lr}", "--set", f"train.steps={steps}"]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_second_run_into_a_busy_run_dir_is_refused(tmp_path: Path, digits_dataset: Path) -> None:
    """Two `hpcai run` into one directory: the second is refused at once (exit 2, one line naming the
    directory and the holder); the first trains with its own spec to the end, metrics not interleaved."""
    run_dir = tmp_path / "run"
    first = _start_run(run_dir, digits_dataset, lr=0.05)
    deadline = time.monotonic() + 60
    while not (run_dir / "logs" / "rank-0.log").exists():  # the first run holds the lock and has started
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.1)
    second = run_cli("run", "jobs/digits.toml", "-n", "1", "--run-dir", str(run_dir),
                     *_digits(digits_dataset), "--set", "train.lr=0.9")  # fmt: skip
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    lines = [x for x in second.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and str(run_dir) in lines[0] and f"pid {first.pid}" in lines[0], second.stderr
    assert "Traceback" not in second.stderr
    assert "lr = 0.05" in (run_dir / "job.toml").read_text()
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    """kill -9 of the holder leaves no stale lock: the next claim succeeds at once."""
    code = f"from hpcai.rundir import acquire; acquire({str(tmp_path / 'r')!r}); print('held', flush=True)"
    code += "; input()"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"in use by another hpcai run \(pid {holder.pid} on host"):
            acquire(tmp_path / "r")
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        acquire(tmp_path / "r").release()
    finally:
        holder.kill()


def test_non_run_directories_are_refused(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "job.toml").write_text("my own notes\n")
    (mine / "metrics.jsonl").write_text("my own metrics\n")
    with pytest.raises(RunDirError, match="not empty and not an hpcai run directory"):
        check_run_dir(mine)
    proc = run_cli("run", "jobs/digits.toml", "-n", "1", "--run-dir", str(mine))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert (mine / "job.toml").read_text() == "my own notes\n"
    assert sorted(p.name for p in mine.iterdir()) == ["job.toml", "metrics.jsonl"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad, why in ((a_file, "is not a directory"), (Path("/proc/self"), "under /proc")):
        proc = run_cli("run", "jobs/digits.toml", "-n", "1", "--run-dir", str(bad))
        assert proc.returncode == 2 and why in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert a_file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    check_run_dir(empty)  # an empty directory is fine


def test_stale_temporaries_are_removed_under_the_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / LOCK_NAME).touch()
    stale = [
        run_dir / ".metrics.jsonl.tmp-node1-123-abcd",
        run_dir / "checkpoints" / ".step-00000300.h5.tmp-node1-123-ab12",
        run_dir / "checkpoints" / ".step-00000400.h5.tmp",  # the fixed name of earlier versions
    ]
    for p in stale:
        p.write_bytes(b"partial")
    keep = run_dir / "checkpoints" / "step-00000200.h5"
    keep.write_bytes(b"committed")
    with acquire(run_dir):
        assert not any(p.exists() for p in stale)
        assert keep.exists()


def test_rank_count_beyond_what_the_machine_holds(tmp_path: Path) -> None:
    proc = run_cli("run", "jobs/digits.toml", "-n", "1000000", "--run-dir", str(tmp_path / "r"),
                   "--set", "train.batch_size=1000000")  # fmt: skip
    assert proc.returncode == 2 and "can hold at most" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "r").exists()


def test_launch_file_is_checked(tmp_path: Path) -> None:
    """Ranks take the spec the launcher resolved, and only if the file is the one it wrote."""
    from hpcai.launch import read_launch_file, write_launch_file
    from hpcai.spec import load_spec, toml_string

    run_dir = tmp_path / "rün🚀"
    run_dir.mkdir()
    spec = load_spec("jobs/digits.toml", [f"job.run_dir={toml_string(str(run_dir))}", "train.lr=0.25"])
    path, digest = write_launch_file(spec)
    assert read_launch_file(str(path), digest).train.lr == 0.25
    assert read_launch_file(str(path), digest).run_dir == run_dir
    path.write_bytes(path.read_bytes().replace(b"0.25", b"0.75"))
    with pytest.raises(UserError, match="changed after the launcher wrote it"):
        read_launch_file(str(path), digest)


def test_bad_input_found_by_every_rank_is_reported_once(tmp_path: Path, digits_dataset: Path) -> None:
    """train.device = "cuda" on a machine without a GPU: every rank finds it, the user reads it once."""
    proc = run_cli("run", "jobs/digits.toml", "-n", "2", "--run-dir", str(tmp_path / "r"),
                   *_digits(digits_dataset), "--set", 'train.device="cuda"')  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("torch sees no GPU") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs filled to the last byte."""
    with small_tmpfs(tmp_path / "full", "64k") as mnt:
        (mnt / "run").mkdir()
        fill_disk(mnt)
        yield mnt


def test_full_disk_at_launch(full_disk: Path, digits_dataset: Path) -> None:
    """No space for job.toml: one line naming it, exit 2, no empty job.toml and no temporary left."""
    run_dir = full_disk / "run"
    proc = run_cli("run", "jobs/digits.toml", "-n", "1", "--run-dir", str(run_dir), *_digits(digits_dataset))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no space left on device" in proc.stderr, proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]
