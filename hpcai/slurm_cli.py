"""``hpcai render``, ``hpcai submit`` and ``hpcai status``: the Slurm subcommands of the hpcai CLI.

    hpcai render jobs/digits.toml --cluster local [-o job.sbatch]    # print (or write) the batch script
    hpcai submit jobs/digits.toml --cluster local --set train.epochs=3
    hpcai submit jobs/digits.toml --cluster local --dry-run          # write the files, do not submit
    hpcai render jobs/digits.toml --cluster local --template array --array 0-3
    hpcai status runs/digits                                         # Slurm state, restarts, progress

submit writes RUN_DIR/job.toml (the resolved spec), RUN_DIR/job.sbatch (which runs it) and RUN_DIR/submit.json
(the job id), then runs ``sbatch --parsable RUN_DIR/job.sbatch`` and prints the job id.

All three take the job arguments of ``hpcai run`` (JOB, -n, --set, --run-dir). ``--cluster`` is a profile
name (NAME.toml in $HPCAI_CLUSTER_DIR, ./cluster or the shipped ones) or a path; ``--template`` a name
(./templates/NAME.sbatch.j2 or the shipped one) or a path. See :mod:`hpcai.resources`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hpcai.errors import UserError
from hpcai.fsio import atomic_write_text
from hpcai.rundir import claim_run_dir

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED",
                 "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}  # fmt: skip


def add_subcommands(
    sub: argparse._SubParsersAction, add_job_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Register render/submit/status on the hpcai parser (``add_job_args`` is cli._add_job_args)."""
    for name, text in (("render", "print the sbatch script of a job"), ("submit", "render and sbatch a job")):
        p = sub.add_parser(name, help=text)
        add_job_args(p)
        p.add_argument(
            "--cluster",
            required=True,
            help="cluster profile: NAME ($HPCAI_CLUSTER_DIR, ./cluster, shipped: NAME.toml) or a path",
        )
        p.add_argument(
            "--template", help="template NAME (templates/NAME.sbatch.j2) or path; default: profile's"
        )
        p.add_argument("--array", help="job array range for the array template, e.g. 0-9%%2")
        if name == "render":
            p.add_argument("-o", "--output", help="write the script here instead of printing it")
        else:
            p.add_argument(
                "--dry-run", action="store_true", help="write job.sbatch and job.toml; do not submit"
            )
    st = sub.add_parser("status", help="Slurm state, restarts and training progress of a submitted run")
    st.add_argument("run_dir", help="the run directory that `hpcai submit` wrote")


def handler(command: str, load: Callable) -> Callable[[argparse.Namespace], int]:
    """The function that runs ``command``; ``load`` is cli._load (job args -> validated JobSpec)."""
    if command == "status":
        return cmd_status
    return {"render": lambda a: cmd_render(a, load), "submit": lambda a: cmd_submit(a, load)}[command]


def _render(args: argparse.Namespace, load) -> tuple[object, str]:
    from hpcai.profiles import load_profile
    from hpcai.slurm import render

    spec = load(args)  # validated spec first: its errors name the job file
    profile = load_profile(args.cluster)
    return spec, render(spec, profile, args.template, array=args.array)


def cmd_render(args: argparse.Namespace, load) -> int:
    _, text = _render(args, load)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_submit(args: argparse.Namespace, load) -> int:
    spec, text = _render(args, load)
    run_dir = spec.run_dir.resolve()
    # Under the run directory's lock: a run going on there, or a second submit at the same moment, is refused.
    with claim_run_dir(run_dir, "hpcai run or submit"):
        return _submit_locked(args, spec, text, run_dir)


def _submit_locked(args: argparse.Namespace, spec, text: str, run_dir: Path) -> int:
    from hpcai import slurm_cmd

    previous = _read_submission(run_dir)
    if previous and not args.dry_run:
        records = slurm_cmd.show_job(previous["job_id"]) or []
        active = [r.get("JobState", "?") for r in records if r.get("JobState") in ACTIVE_STATES]
        if active:
            raise UserError(
                f"{run_dir}: job {previous['job_id']} is still {active[0]} there; two jobs in one run "
                f"directory would share checkpoints (scancel {previous['job_id']}, or pass another --run-dir)"
            )
    script = run_dir / "job.sbatch"
    atomic_write_text(run_dir / "job.toml", spec.to_toml())  # what the script runs, overrides applied
    atomic_write_text(script, text)
    if args.dry_run:
        print(
            f"# dry run: wrote {script} and {run_dir / 'job.toml'}; submit with: sbatch --parsable {script}"
        )
        return 0
    job_id = slurm_cmd.sbatch(str(script))
    record_submission(run_dir, job_id, args.cluster)
    print(job_id)
    return 0


def record_submission(run_dir: Path, job_id: str, cluster: str) -> None:
    """RUN_DIR/submit.json: how `hpcai status RUN_DIR` finds the job."""
    record = {
        "job_id": job_id,
        "cluster": cluster,
        "script": str(run_dir / "job.sbatch"),
        "submitted": time.time(),
    }
    atomic_write_text(run_dir / "submit.json", json.dumps(record, indent=2) + "\n")


def _read_submission(run_dir: Path) -> dict | None:
    path = run_dir / "submit.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON") from None
    if not isinstance(record, dict) or not re.fullmatch(r"\d+", str(record.get("job_id", ""))):
        raise UserError(f"{path}: job_id: missing or not a Slurm job id")
    return record


def cmd_status(args: argparse.Namespace) -> int:
    """Print what Slurm and the run directory say; exit 0 (1 if the run dir holds no submission)."""
    from hpcai import slurm_cmd

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    sub = _read_submission(run_dir)
    print(f"run dir: {run_dir}")
    if sub is None:
        print("slurm: not submitted (no submit.json; `hpcai submit` writes it)")
    else:
        age = time.time() - float(sub.get("submitted", time.time()))
        print(f"job: {sub['job_id']} (cluster {sub.get('cluster', '?')}, submitted {age:.0f} s ago)")
        for line in _slurm_lines(slurm_cmd, sub["job_id"]):
            print(line)
    restart = _log_restart_count(run_dir)
    if restart is not None:
        print(f"log: last start had SLURM_RESTART_COUNT={restart}")
    tasks = sorted(run_dir.glob("task-*/"))  # the array template's default: one run dir per task
    if tasks and not (run_dir / "metrics.jsonl").exists():
        for task in tasks:
            print(f"{task.name}: {_progress(task)}")
    else:
        print(_progress(run_dir))
    return 0 if sub else 1


def _slurm_lines(slurm_cmd, job_id: str) -> list[str]:
    records = slurm_cmd.show_job(job_id)
    if records:
        lines = []
        for r in records:
            task = f" task {r['ArrayTaskId']}" if r.get("ArrayTaskId") else ""
            lines.append(
                f"slurm{task}: {r.get('JobState', '?')} (reason {r.get('Reason', '?')}), restarts "
                f"{r.get('Restarts', '?')}, run time {r.get('RunTime', '?')} of {r.get('TimeLimit', '?')}, "
                f"exit code {r.get('ExitCode', '?')}, nodes {r.get('NodeList', '?')}"
            )
        return lines
    acct = slurm_cmd.accounting(job_id)
    if acct:
        return [f"slurm (sacct) {jid}: {state}, exit code {code}" for jid, state, code in acct]
    return ["slurm: job no longer known to slurmctld (MinJobAge passed) and no accounting (sacct)"]


def _log_restart_count(run_dir: Path) -> int | None:
    """The batch script prints SLURM_RESTART_COUNT=N at every start into RUN_DIR/slurm-*.out."""
    count = None
    for log in sorted(run_dir.glob("slurm-*.out"), key=lambda p: p.stat().st_mtime):
        for m in re.finditer(r"SLURM_RESTART_COUNT=(\d+)", log.read_text(errors="replace")):
            count = int(m.group(1))
    return count


def _progress(run_dir: Path) -> str:
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            return (
                f"done: {s.get('steps')} steps on {s.get('world_size')} ranks, final loss "
                f"{s.get('final_loss'):.4f}, test accuracy {s.get('test_accuracy'):.4f} (summary.json)"
            )
        except (json.JSONDecodeError, TypeError, ValueError):
            return f"done: {summary} present but unreadable"
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    for line in reversed(lines):  # the last line may be half written
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        age = time.time() - metrics.stat().st_mtime
        loss = m.get("loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "?"
        return f"progress: step {m.get('step')} epoch {m.get('epoch')} loss {loss_text} ({age:.0f} s ago)"
    return "progress: no metrics yet"
