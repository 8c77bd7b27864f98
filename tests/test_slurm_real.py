"""Real Slurm: rendered scripts submitted with sbatch to the single-node cluster of scripts/slurm-local.sh.

    sudo scripts/slurm-local.sh start                 # once (the tests also call it: idempotent)
    pytest tests/test_slurm_real.py                   # ~1-2 min
    HPCAI_REQUIRE_SLURM=1 pytest tests/test_slurm_real.py   # CI: no Slurm is a failure, not a skip

Skipped where Slurm cannot run here (not root, no sbatch) unless HPCAI_REQUIRE_SLURM=1. Every command has a
timeout and every wait a deadline; a job still queued when a test ends is cancelled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcai.profiles import PROJECT_ROOT, load_profile
from hpcai.slurm import Context, render
from hpcai.slurm_cli import record_submission
from hpcai.slurm_cmd import sbatch, show_job
from hpcai.spec import load_spec

REQUIRE = os.environ.get("HPCAI_REQUIRE_SLURM") == "1"
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
}


def _unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"HPCAI_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm() -> None:
    """A running local Slurm (started by scripts/slurm-local.sh, which installs it where it may)."""
    if os.geteuid() != 0:
        _unavailable("Slurm tests need root (scripts/slurm-local.sh starts daemons)")
    if shutil.which("sbatch") is None and not REQUIRE:
        _unavailable("no sbatch: run `sudo scripts/slurm-local.sh start` (or set HPCAI_REQUIRE_SLURM=1)")
    try:
        proc = subprocess.run(
            [str(PROJECT_ROOT / "scripts" / "slurm-local.sh"), "start"],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        _unavailable("scripts/slurm-local.sh start did not finish within 900 s")
    if proc.returncode != 0:
        _unavailable(f"scripts/slurm-local.sh start failed: {(proc.stderr or proc.stdout).strip()[-500:]}")


@pytest.fixture
def jobs():
    """Job ids submitted by a test; any still queued or running at the end are cancelled."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def _env() -> dict[str, str]:
    # sbatch exports this environment to the job: the job imports hpcai from this checkout.
    return {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"}


def _hpcai(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpcai", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _state(job_id: str) -> dict[str, str]:
    records = show_job(job_id)
    assert records, f"job {job_id} unknown to slurmctld"
    return records[0]


def _wait(what: str, check, deadline_s: float, poll_s: float = 1.0):
    """Poll ``check()`` until it returns something truthy; fail (never hang) after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _wait_finished(job_id: str, deadline_s: float = 240) -> dict[str, str]:
    return _wait(
        f"job {job_id} to finish", lambda: (r := _state(job_id)).get("JobState") in FINISHED and r, deadline_s
    )


def _set_args(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


def _log(run_dir: Path, job_id: str) -> str:
    out = run_dir / f"slurm-{job_id}.out"
    return out.read_text(errors="replace") if out.exists() else ""


def test_two_rank_digits_job_completes(slurm, jobs, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "jobs/digits.toml",
        "--cluster",
        "local",
        "-n",
        "2",
        "--set",
        "train.epochs=3",
        "--run-dir",
        str(run_dir),
    ]
    proc = _hpcai(
        "submit", *[str(PROJECT_ROOT / a) if a.startswith("jobs/") else a for a in args], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    jobs.append(job_id)
    record = _wait_finished(job_id)
    assert record["JobState"] == "COMPLETED", f"{record}\n{_log(run_dir, job_id)}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] > 0
    assert "SLURM_RESTART_COUNT=0" in _log(run_dir, job_id)
    status = _hpcai("status", str(run_dir), cwd=tmp_path, timeout=60)
    assert "slurm: COMPLETED" in status.stdout and "done: " in status.stdout, status.stdout + status.stderr


# ---------------------------------------------------------------------------------------------- requeue
# A stand-in "python" plays the training side of the contract: it writes a metrics line, exits 75 on USR1,
# and on the restarted run (SLURM_RESTART_COUNT=1) finishes at once. This checks Slurm's part without
# needing checkpoints: --signal/--requeue lines, the trap, the forwarding through srun, scontrol requeue.

STAND_IN = """#!/bin/bash
run_dir="$(dirname "$4")"
trap 'echo "stand-in: USR1 at $(date +%s.%N)"; exit 75' USR1
echo "stand-in: rank ${PMI_RANK:-?} of ${PMI_SIZE:-?} start $(date +%s.%N) restart ${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then exit 0; fi
echo '{"step": 1, "loss": 1.0}' >> "$run_dir/metrics.jsonl"
for i in $(seq 600); do sleep 0.1; done
exit 0
"""


def _signal_when_training(run_dir: Path, job_id: str) -> float:
    """Wait for the first metrics line, then send USR1 to the batch shell; return when it was sent."""
    metrics = run_dir / "metrics.jsonl"
    _wait("the first metrics line", lambda: metrics.exists() and metrics.read_text().strip(), 180, 0.2)
    assert _state(job_id)["JobState"] == "RUNNING"
    t_signal = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    return t_signal


def test_usr1_requeues_and_the_job_restarts(slurm, jobs, tmp_path):
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    run_dir = tmp_path / "run"
    spec = load_spec(PROJECT_ROOT / "jobs" / "digits.toml", [f"job.run_dir = {json.dumps(str(run_dir))}"])
    run_dir.mkdir()
    (run_dir / "job.toml").write_text(spec.to_toml())
    script = run_dir / "job.sbatch"
    script.write_text(render(spec, load_profile("local"), context=Context(str(stand_in), str(tmp_path))))
    job_id = sbatch(str(script))  # the stand-in needs no environment from here
    jobs.append(job_id)
    record_submission(run_dir, job_id, "local")  # as `hpcai submit` does, so that `hpcai status` finds it
    t_signal = _signal_when_training(run_dir, job_id)
    _wait("the restart", lambda: "SLURM_RESTART_COUNT=1" in _log(run_dir, job_id), 180, 0.5)
    restart_s = time.monotonic() - t_signal
    record = _wait_finished(job_id)
    log = _log(run_dir, job_id)
    print(f"job {job_id}: restarted {restart_s:.1f} s after USR1; final {record['JobState']}\n{log}")
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", f"{record}\n{log}"
    assert log.count("stand-in: USR1") == 2, log  # both ranks got the signal through srun
    assert "requeueing " + job_id in log
    status = _hpcai("status", str(run_dir), cwd=tmp_path, timeout=60)
    assert "restarts 1" in status.stdout and "SLURM_RESTART_COUNT=1" in status.stdout, status.stdout


def _has_checkpoint_resume() -> bool:
    """The training side of the contract: some module of hpcai handles SIGUSR1 (checkpoint, exit 75)."""
    mine = {"slurm.py", "slurm_cli.py", "slurm_cmd.py", "profiles.py"}
    return any(
        "SIGUSR1" in p.read_text() for p in (PROJECT_ROOT / "hpcai").rglob("*.py") if p.name not in mine
    )


@pytest.mark.skipif(
    not _has_checkpoint_resume(),
    reason="needs checkpoint/resume on the training side: ranks that checkpoint and exit 75 on SIGUSR1, and "
    "`hpcai run RUN_DIR/job.toml` resuming from RUN_DIR/checkpoints/ (no SIGUSR1 handling in hpcai/ yet)",
)
def test_requeued_digits_job_ends_like_an_uninterrupted_run(slurm, jobs, tmp_path):
    # USR1 goes out at the first metrics line (step 10), so 1,500 steps leave most of the run to the restart.
    sets = ["train.steps=1500", "train.log_every=10", f"data.path = {json.dumps(str(tmp_path / 'data'))}"]
    reference = tmp_path / "reference"
    ref_sets = [*sets, f"job.run_dir = {json.dumps(str(reference))}"]
    job = str(PROJECT_ROOT / "jobs" / "digits.toml")
    proc = _hpcai("run", job, "-n", "2", *_set_args(ref_sets), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = json.loads((reference / "summary.json").read_text())["final_loss"]

    run_dir = tmp_path / "run"
    proc = _hpcai("submit", job, "--cluster", "local", "-n", "2", "--run-dir", str(run_dir), *_set_args(sets),
                  cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    jobs.append(job_id)
    t_signal = _signal_when_training(run_dir, job_id)
    record = _wait_finished(job_id, deadline_s=400)
    log = _log(run_dir, job_id)
    assert "SLURM_RESTART_COUNT=1" in log, f"no restart (did training finish before USR1?)\n{log}"
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", f"{record}\n{log}"
    assert list((run_dir / "checkpoints").iterdir()), "no checkpoint written"
    final = json.loads((run_dir / "summary.json").read_text())["final_loss"]
    took = time.monotonic() - t_signal
    print(f"job {job_id}: {took:.1f} s from USR1 to the end; final_loss {final}, uninterrupted {expected}")
    assert json.loads((run_dir / "summary.json").read_text()).get("resumed_from_step", 0) > 0
    assert final == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert re.search(r"requeueing \d+", log)
