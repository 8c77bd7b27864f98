"""Hangs outside the collectives, signals outside the training loop, and a launcher killed alone.

Real ``hpcai run -n 2`` jobs under timeouts. A job that hangs is the failure these tests look for: on a
timeout every process of the run (found by its unique run directory in the command line) is killed, so a
failing test leaves nothing running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env

# A user's model factory that never returns on rank 1: stuck in Python before the first collective.
LOOPING_FACTORY = """
import time
from mpi4py import MPI
from torch import nn

def make_model():
    if MPI.COMM_WORLD.Get_rank() == 1:
        open(MARK, "w").close()
        while True:
            time.sleep(0.05)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
"""


def _processes_of(run_dir: Path) -> list[int]:
    """Processes (mpiexec, ranks) whose command line names ``run_dir``: only this test's run uses it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in cmdline:
            found.append(int(entry.name))
    return found


def _kill_run(run_dir: Path) -> None:
    for pid in _processes_of(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Job:
    """``hpcai run jobs/digits.toml -n 2 --run-dir RUN_DIR ...`` in the background, stderr collected."""

    def __init__(self, run_dir: Path, *args: str):
        self.run_dir = run_dir
        cmd = [sys.executable, "-m", "hpcai", "run", "jobs/digits.toml", "-n", "2", "--run-dir", str(run_dir)]
        self.proc = subprocess.Popen(
            [*cmd, *args],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, what: str, ready, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"never saw {what} (exit {self.proc.returncode}):\n{self.stderr}")
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> int:
        """The launcher's exit status; a job still running after ``timeout`` fails the test (killed)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not end within {timeout} s:\n{self.stderr}")
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        _kill_run(self.run_dir)


def _data(path: Path) -> list[str]:
    return ["--set", f"data.path={json.dumps(str(path))}"]


def _looping(tmp_path: Path) -> tuple[list[str], Path]:
    mark = tmp_path / "rank1-looping"
    factory = tmp_path / "looping.py"
    factory.write_text(LOOPING_FACTORY.replace("MARK", repr(str(mark))))
    return ["--set", f"model.factory={json.dumps(f'{factory}:make_model')}"], mark


def test_a_rank_stuck_before_the_first_collective_is_named_and_stall_abort_ends_the_job(
    tmp_path: Path, digits_dataset: Path
) -> None:
    factory, _ = _looping(tmp_path)
    abort = ["--set", "comm.stall_timeout_s=3", "--set", "comm.stall_abort=true"]
    job = Job(tmp_path / "run", *_data(digits_dataset), *factory, *abort)
    assert job.finish() == 3, job.stderr
    pattern = r"hpcai: rank 0: stalled \d+\.\d s in startup phase '[a-z ]+' \(#\d+\): rank 1 has not arrived "
    pattern += r"\(rank 1 at #\d+ 'model build'\)"
    assert re.search(pattern, job.stderr), job.stderr
    assert "aborting the job (stall_abort)" in job.stderr
    assert not _processes_of(job.run_dir)


def test_without_stall_abort_the_startup_stall_is_said_once_and_sigterm_ends_the_job_143(
    tmp_path: Path, digits_dataset: Path
) -> None:
    factory, _ = _looping(tmp_path)
    job = Job(tmp_path / "run", *_data(digits_dataset), *factory, "--set", "comm.stall_timeout_s=2")
    job.wait_for("the stall report", lambda: "in startup phase" in job.stderr)
    time.sleep(2.5)  # longer than the timeout again: a second report would come now
    job.proc.send_signal(signal.SIGTERM)  # what a Slurm batch script passes on
    assert job.finish() == 143, job.stderr
    assert sum("stalled" in line for line in job.lines) == 1, job.stderr
    said = [line for line in job.lines if "SIGTERM" in line]
    assert len(said) == 1, job.stderr  # one line for the job, from whichever rank ended it
    assert re.fullmatch(
        r"hpcai: rank [01]: SIGTERM in startup phase '[a-z ]+': job stopped, no checkpoint written", said[0]
    )


def test_sigterm_during_the_automatic_dataset_build_ends_143_and_leaves_no_temporaries(
    tmp_path: Path,
) -> None:
    # Two token windows of 2,000,000: a minute of generating on rank 0, in Python, with little memory.
    out = tmp_path / "data" / "built"
    source = ["--set", "data.source='synthetic-tokens:n=2,seq=2000000'"]
    job = Job(tmp_path / "run", *_data(out), *source, "--set", "comm.stall_timeout_s=0")
    job.wait_for("the build's temporary directory", lambda: any(out.parent.glob(".*.tmp-*")))
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == 143, job.stderr
    assert (
        "hpcai: rank 0: SIGTERM in startup phase 'dataset': job stopped, no checkpoint written" in job.lines
    )
    assert sorted(p.name for p in out.parent.iterdir() if ".tmp-" in p.name) == [], job.stderr
    assert not out.exists()


def test_sigusr1_during_the_automatic_dataset_build_checkpoints_at_the_first_step(tmp_path: Path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "data" / "built"
    source = ["--set", "data.source='synthetic-images:n=8192,size=16,classes=4'", "--set", "train.steps=20"]
    job = Job(run_dir, *_data(out), *source, "--set", "comm.stall_timeout_s=0")
    job.wait_for("the build's temporary directory", lambda: any(out.parent.glob(".*.tmp-*")))
    job.proc.send_signal(signal.SIGUSR1)  # Slurm's warning: remembered until the loop can checkpoint
    assert job.finish() == 75, job.stderr
    assert "stopped on a signal at step 1" in job.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000001.h5"]


def test_a_second_sigterm_ends_a_training_stuck_between_steps_75_with_its_checkpoint(
    tmp_path: Path, digits_dataset: Path
) -> None:
    run_dir = tmp_path / "run"
    sets = ["train.steps=1000", "checkpoint.every_steps=2", "checkpoint.async_save=false"]
    args = [a for s in sets for a in ("--set", s)] + ["--inject-failure", "step=3,rank=1,how=hang"]
    job = Job(run_dir, *_data(digits_dataset), *args)
    log = run_dir / "logs" / "rank-1.log"
    job.wait_for("rank 1 hanging", lambda: log.exists() and "injected failure: hang" in log.read_text())
    assert (run_dir / "checkpoints" / "step-00000002.h5").exists()
    job.proc.send_signal(signal.SIGTERM)  # asks for a checkpoint at the next step, which never comes
    time.sleep(1.0)
    assert job.proc.poll() is None, job.stderr
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == 75, job.stderr
    said = [line for line in job.lines if "SIGTERM" in line]
    assert len(said) == 1 and "second SIGTERM during training" in said[0], job.stderr
    assert "checkpoint step-00000002.h5 written: run the same command again to continue" in said[0]


def test_killing_the_launcher_alone_leaves_no_rank_running(tmp_path: Path, digits_dataset: Path) -> None:
    run_dir = tmp_path / "run"
    job = Job(
        run_dir, *_data(digits_dataset), "--set", "train.steps=100000", "--set", "comm.stall_timeout_s=0"
    )
    metrics = run_dir / "metrics.jsonl"
    job.wait_for("training", lambda: metrics.exists() and metrics.read_text().count("\n") >= 1)
    assert len(_processes_of(run_dir)) >= 3  # mpiexec and two ranks
    os.kill(job.proc.pid, signal.SIGKILL)
    job.proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    while _processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _processes_of(run_dir)
    _kill_run(run_dir)
    assert left == [], "still running after the launcher was killed: " + ", ".join(map(str, left))


# Every rank's main thread blocked inside MPI (no Python signal handler can run there): each waits in
# MPI_Recv for a message that never comes.
DEADLOCK = """
import sys
import numpy as np
from mpi4py import MPI
from hpcai.comm.abort import JobSignals

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
signals = JobSignals(rank, comm.Get_size())
signals.where = lambda: "in a test's deadlock"
open(f"{sys.argv[1]}-{rank}", "w").close()
comm.Recv(np.zeros(1), source=1 - rank)
"""

LAUNCH = """
import sys
from hpcai.launch import run_ranks
sys.exit(run_ranks(2, [sys.argv[1], sys.argv[2]]))
"""


def test_a_signal_ends_the_job_when_every_rank_waits_inside_mpi(tmp_path: Path) -> None:
    script = tmp_path / "deadlock.py"
    script.write_text(DEADLOCK)
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(script), str(ready)],
        cwd=ROOT,
        env=cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not all(Path(f"{ready}-{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    time.sleep(0.3)  # into MPI_Recv
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _kill_run(tmp_path)
        pytest.fail("SIGTERM did not end a job whose ranks all wait inside MPI")
    assert proc.returncode == 143, err
    said = [line for line in err.splitlines() if "SIGTERM" in line]
    assert len(said) == 1 and "SIGTERM in a test's deadlock: job stopped" in said[0], err
