"""hpcai render/submit/status against stand-in sbatch/scontrol/sacct on PATH (no Slurm needed; ~1 s).

pytest tests/test_slurm_cli.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpcai.cli import main
from hpcai.profiles import PROJECT_ROOT
from hpcai.slurm_cmd import parse_scontrol_record
from hpcai.spec import load_spec

JOB = str(PROJECT_ROOT / "jobs" / "digits.toml")
RECORD = (
    "JobId=4242 JobName=x; rm -rf ~ UserId=root(0) JobState=RUNNING Reason=None Dependency=(null) "
    "Requeue=1 Restarts=1 BatchFlag=1 ExitCode=0:0 RunTime=00:00:09 TimeLimit=00:30:00 NodeList=vm"
)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch prints a job id; scontrol prints $FAKE_SCONTROL (or 'Invalid job id'); every call is logged."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    scripts = {
        "sbatch": 'echo "sbatch $*" >> "$FAKE_LOG"; echo "4242;local"',
        "scontrol": 'echo "scontrol $*" >> "$FAKE_LOG"\n'
        'if [ -n "${FAKE_SCONTROL:-}" ]; then echo "$FAKE_SCONTROL"; exit 0; fi\n'
        'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1',
        "sacct": 'echo "sacct $*" >> "$FAKE_LOG"\n'
        'echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("FAKE_SCONTROL", raising=False)
    monkeypatch.chdir(tmp_path)
    return log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_submit_writes_script_and_spec_and_prints_job_id(fake_slurm, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = main(
        ["submit", JOB, "--cluster", "local", "-n", "2", "--set", "train.epochs=3", "--run-dir", str(run_dir)]
    )
    assert rc == 0
    assert capsys.readouterr().out == "4242\n"
    assert _calls(fake_slurm) == [f"sbatch --parsable {run_dir / 'job.sbatch'}"]
    script = (run_dir / "job.sbatch").read_text()
    assert f"-m hpcai run {run_dir / 'job.toml'} &" in script
    resolved = load_spec(run_dir / "job.toml")  # what the script runs: overrides applied
    assert resolved.train.epochs == 3 and resolved.job.ranks == 2 and resolved.run_dir == run_dir
    assert json.loads((run_dir / "submit.json").read_text())["job_id"] == "4242"


def test_dry_run_writes_files_but_does_not_submit(fake_slurm, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["submit", JOB, "--cluster", "local", "--run-dir", str(run_dir), "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert (run_dir / "job.sbatch").is_file() and (run_dir / "job.toml").is_file()
    assert _calls(fake_slurm) == [] and not (run_dir / "submit.json").exists()


def test_submit_refuses_a_run_dir_whose_job_is_still_running(fake_slurm, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    assert main(["submit", JOB, "--cluster", "local", "--run-dir", str(run_dir)]) == 0
    monkeypatch.setenv("FAKE_SCONTROL", RECORD)
    assert main(["submit", JOB, "--cluster", "local", "--run-dir", str(run_dir)]) == 2
    assert "job 4242 is still RUNNING" in capsys.readouterr().err
    assert sum(c.startswith("sbatch") for c in _calls(fake_slurm)) == 1


def test_render_prints_or_writes(fake_slurm, tmp_path, capsys):
    assert main(["render", JOB, "--cluster", "local"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("#!/bin/bash\n") and "#SBATCH --partition=debug" in printed
    assert main(["render", JOB, "--cluster", "local", "-o", "x.sbatch"]) == 0
    assert (tmp_path / "x.sbatch").read_text() == printed
    assert _calls(fake_slurm) == []


def test_status_shows_state_restarts_and_progress(fake_slurm, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    assert main(["submit", JOB, "--cluster", "local", "--run-dir", str(run_dir)]) == 0
    (run_dir / "slurm-4242.out").write_text(
        "hpcai: job 4242 on vm SLURM_RESTART_COUNT=0 start x\n"
        "hpcai: job 4242 on vm SLURM_RESTART_COUNT=1 start y\n"
    )
    (run_dir / "metrics.jsonl").write_text(
        '{"step": 10, "epoch": 0, "loss": 2.5}\n{"step": 20, "epoch": 1, "lo'
    )
    monkeypatch.setenv("FAKE_SCONTROL", RECORD)
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "slurm: RUNNING (reason None), restarts 1, run time 00:00:09 of 00:30:00" in out
    assert "SLURM_RESTART_COUNT=1" in out
    assert "progress: step 10 epoch 0 loss 2.5000" in out  # the half-written last line is skipped
    (run_dir / "summary.json").write_text(
        json.dumps({"steps": 66, "world_size": 2, "final_loss": 0.5, "test_accuracy": 0.9})
    )
    monkeypatch.delenv("FAKE_SCONTROL")
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "no longer known to slurmctld" in out and "done: 66 steps on 2 ranks, final loss 0.5000" in out


def test_status_of_an_array_reports_each_task(fake_slurm, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "submit",
                JOB,
                "--cluster",
                "local",
                "--template",
                "array",
                "--array",
                "0-1",
                "--run-dir",
                str(run_dir),
            ]
        )
        == 0
    )
    for i, loss in ((0, 1.5), (1, 0.25)):
        (run_dir / f"task-{i}").mkdir()
        (run_dir / f"task-{i}" / "metrics.jsonl").write_text(
            json.dumps({"step": 5, "epoch": 0, "loss": loss}) + "\n"
        )
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert (
        "task-0: progress: step 5 epoch 0 loss 1.5000" in out
        and "task-1: progress: step 5 epoch 0 loss 0.2500" in out
    )


def test_status_of_a_bad_run_dir_is_one_line_exit_2(fake_slurm, tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"hpcai: error: {tmp_path / 'nope'}: no such run directory\n"


def test_missing_sbatch_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm commands at all
    monkeypatch.chdir(tmp_path)
    assert main(["submit", JOB, "--cluster", "local", "--run-dir", str(tmp_path / "run")]) == 2
    assert "sbatch: not found" in capsys.readouterr().err


def test_scontrol_record_values_may_hold_spaces():
    r = parse_scontrol_record(RECORD)
    assert r["JobName"] == "x; rm -rf ~" and r["Restarts"] == "1" and r["NodeList"] == "vm"
