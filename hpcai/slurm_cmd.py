"""The one place that runs Slurm's commands (sbatch, scontrol, squeue, sacct). Tests fake it by putting
stand-in scripts named sbatch/scontrol/... first on PATH, or by replacing :func:`call`.

Every call has a timeout: a hung slurmctld makes `hpcai submit`/`status` fail, not hang.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from hpcai.errors import UserError

TIMEOUT_S = 30.0


class SlurmCommandError(UserError):
    """A Slurm command that is missing, timed out or failed (its stderr in the message)."""


def call(argv: list[str], timeout: float = TIMEOUT_S) -> str:
    """Run a Slurm command; return stdout, or raise SlurmCommandError with its first stderr line."""
    if shutil.which(argv[0]) is None:
        raise SlurmCommandError(
            f"{argv[0]}: not found (no Slurm here? `sudo scripts/slurm-local.sh start` brings up a local one)"
        )
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmCommandError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from None
    if proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()[0]
        raise SlurmCommandError(f"{' '.join(argv)}: {why}")
    return proc.stdout


def sbatch(script: str) -> str:
    """``sbatch --parsable SCRIPT`` -> the job id (``--parsable`` prints ``ID`` or ``ID;CLUSTER``)."""
    out = call(["sbatch", "--parsable", script]).strip()
    job_id = out.splitlines()[-1].split(";")[0] if out else ""
    if not re.fullmatch(r"\d+", job_id):
        raise SlurmCommandError(f"sbatch --parsable {script}: expected a job id, got {out!r}")
    return job_id


_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z:/]*)=")


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One ``scontrol -o show job`` line -> {key: value}. Values may hold spaces (JobName=a b), so a value
    runs up to the next ``Key=``."""
    matches = list(_FIELD.finditer(line))
    record = {}
    for m, nxt in zip(matches, matches[1:] + [None], strict=True):
        end = nxt.start() if nxt else len(line)
        record[m.group(1)] = line[m.end() : end].strip()
    return record


def show_job(job_id: str) -> list[dict[str, str]] | None:
    """``scontrol -o show job ID``: one record per job (or array task); None once slurmctld forgot it."""
    try:
        out = call(["scontrol", "-o", "show", "job", job_id])
    except SlurmCommandError as e:
        if "Invalid job id" in str(e):
            return None
        raise
    return [parse_scontrol_record(line) for line in out.splitlines() if line.strip()]


def accounting(job_id: str) -> list[tuple[str, str, str]] | None:
    """``sacct -X``: (job id, state, exit code) per job/task, or None where accounting is not set up."""
    if shutil.which("sacct") is None:
        return None
    try:
        out = call(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode"])
    except SlurmCommandError:
        return None  # "Slurm accounting storage is disabled"
    return [tuple(line.split("|", 2)) for line in out.splitlines() if line.count("|") == 2]  # type: ignore[misc]
