"""The MPI side of a sweep: a coordinator on world rank 0, trial groups on the other ranks, one trial runner.

    hpcai sweep jobs/digits_sweep.toml -n 5        # mpiexec -n 5 python -m hpcai.sweep SWEEP_DIR/sweep.toml
    mpiexec -n 5 hpcai sweep jobs/digits_sweep.toml
    srun --mpi=pmi2 -n 2 hpcai sweep SWEEP --task  # one Slurm array task: takes trials from the ledger

Layout: world rank 0 only coordinates (it holds the searcher, the pruner and the ledger, and does not train);
ranks 1.. split into groups of ``parallel.ranks_per_trial`` consecutive ranks (``world.Split``). A group's
rank 0 sends ``ask`` (with the result of its last trial) and gets the next trial at once; the group trains it
with :func:`hpcai.worker.train_job` on the group communicator, in SWEEP_DIR/trials/NNNN/. During training
the group's rank 0 sends each per-epoch test accuracy and gets back the pruning verdict. Control messages are
tiny dicts, so lowercase (pickled) send/recv; they go on a Dup of COMM_WORLD, apart from training traffic.

The coordinator polls with Iprobe and a 5 ms sleep instead of a blocking recv: MPICH busy-waits in a blocking
receive, which would take a core from the trials on an oversubscribed node.

Failures: an exception inside a trial is caught on the rank that raised it; then every rank of the group
learns of it through an allgather of the error texts, and the trial is recorded as failed. Limit: a rank that
fails while the others wait in a training collective (an exception on one rank only, mid-step) leaves those
ranks waiting: that group hangs (with ranks_per_trial = 1 this cannot happen). Errors that strike all ranks
alike (a bad spec value, a model factory that raises, a diverging loss) are caught cleanly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from mpi4py import MPI

from hpcai.comm.abort import abort_job
from hpcai.errors import UserError
from hpcai.sweep import Ledger, Scheduler, SweepSpec, groups_for, prepare_dir, read_objective, toml_override

TAG_ASK, TAG_TRIAL, TAG_REPORT, TAG_VERDICT = 11, 12, 13, 14
EXIT_PREEMPTED = 75


def _say(msg: str) -> None:
    print(f"sweep: {msg}", flush=True)


def _setup(spec: SweepSpec) -> None:
    """Rank 0, before any trial: the sweep dir and the dataset (built once, not by concurrent trials)."""
    from hpcai.spec import load_spec
    from hpcai.worker import _ensure_dataset

    prepare_dir(spec)
    base = load_spec(spec.sweep.base, spec.sweep.set, ranks=spec.parallel.ranks_per_trial)
    _ensure_dataset(base, _say)


def run_trial(spec: SweepSpec, record: dict[str, Any], group: MPI.Comm, ask_verdict) -> dict[str, Any]:
    """Every rank of ``group``: train one trial; on the group's rank 0 return its result for the ledger.

    ``ask_verdict(epoch, test_accuracy) -> bool`` is called on the group's rank 0 only (pruning).
    """
    from hpcai.spec import load_spec
    from hpcai.topology import Topology
    from hpcai.train import Preempted
    from hpcai.worker import train_job

    t0 = time.time()
    run_dir = Path(record["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [*spec.trial_overrides(record["params"]), toml_override("job.run_dir", str(run_dir))]
    os.environ["HPCAI_TTY"] = "0"  # no progress bars from trials; their lines go to the trial's stdout.log
    os.environ.setdefault("HPCAI_RESUME", "auto")  # a re-run trial continues from its own checkpoint

    def on_eval(epoch: int, accuracy: float) -> bool:
        return bool(ask_verdict(epoch, accuracy)) if group.Get_rank() == 0 else False

    summary, error, preempted = None, None, False
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            job = load_spec(spec.sweep.base, overrides, ranks=group.Get_size())
            topo = Topology.data_parallel(group)
            try:
                summary = train_job(job, topo, t0, on_eval=on_eval)
            finally:
                topo.dp_comm.Free()
    except Preempted:
        preempted = True
    except Exception as e:  # noqa: BLE001 - a crashing trial is recorded, the sweep goes on
        error = f"rank {group.Get_rank()}: {type(e).__name__}: {e}"
        log = run_dir / "logs" / f"trial-rank-{group.Get_rank()}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
    finally:
        if group.Get_rank() == 0:
            with open(run_dir / "stdout.log", "a") as f:
                f.write(out.getvalue())
    errors = [e for e in group.allgather(error) if e]  # every rank of the group learns of a failure
    if any(group.allgather(preempted)):
        return {"status": "preempted"}  # on every rank: the whole group stops
    if group.Get_rank() != 0:
        return {}
    if errors:
        return {"status": "failed", "objective": None, "error": "; ".join(errors), "ranks": group.Get_size()}
    objective = read_objective(spec, run_dir, summary)
    return {
        "status": "pruned" if summary.get("stopped_early") else "complete",
        "objective": objective,
        "epochs": summary.get("epochs"),
        "steps": summary.get("steps"),
        "ranks": group.Get_size(),
        **({"error": f"objective {spec.objective.key} not produced"} if objective is None else {}),
    }


# ---------------------------------------------------------------------------------------------- MPI mode


def run_mpi(spec: SweepSpec, world: MPI.Comm | None = None) -> int:
    """Every rank of an mpiexec world: rank 0 coordinates, the others train in groups. Exit status."""
    world = (world or MPI.COMM_WORLD).Dup()  # control messages apart from anything else on the world
    rank, size = world.Get_rank(), world.Get_size()
    n_groups = groups_for(spec, size)  # the same check on every rank: all raise alike, nobody waits
    problem, held = None, contextlib.ExitStack()
    if rank == 0:
        try:
            _setup(spec)
            held.enter_context(Ledger(spec.dir).locked(blocking=False))  # one sweep per directory
        except UserError as e:
            problem = str(e)
    problem = world.bcast(problem, root=0)
    if problem:
        if rank == 0:
            sys.stderr.write(f"hpcai: error: {problem}\n")
        return 2
    r = spec.parallel.ranks_per_trial
    group = world.Split(MPI.UNDEFINED if rank == 0 else (rank - 1) // r, rank)
    try:
        if rank == 0:
            with held:
                return _coordinate(spec, world, n_groups)
        _group_loop(spec, world, group, (rank - 1) // r)
    except BaseException as e:  # noqa: BLE001 - outside a trial, a failure would leave the others waiting
        abort_job(
            f"hpcai: rank {rank}: error: sweep: {type(e).__name__}: {e}\n{traceback.format_exc()}",
            130 if isinstance(e, KeyboardInterrupt) else 1,
        )
    group.Free()
    return 0


def _coordinate(spec: SweepSpec, world: MPI.Comm, n_groups: int) -> int:
    from hpcai.sweep_cli import finish_report

    stop = {"signal": None}
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # stop handing out trials; running ones checkpoint
        signal.signal(sig, lambda s, _f: stop.update(signal=s))
    ledger = Ledger(spec.dir)
    preempted = False
    # run_mpi holds the ledger's lock: every 'running' trial in it is stale (left by an earlier run).
    sched = Scheduler(spec, ledger, stale=lambda r: True)
    done = sum(r["status"] != "running" for r in sched.records.values())
    _say(f"{spec.sweep.method} search, {n_groups} groups x {spec.parallel.ranks_per_trial} ranks, "
         f"{done} trials already done, {len(sched.requeue)} to re-run, budget {spec.budget.trials} "
         f"-> {spec.dir}")  # fmt: skip
    active = n_groups
    status = MPI.Status()
    while active:
        if not world.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, status):
            time.sleep(0.005)
            continue
        src, tag = status.Get_source(), status.Get_tag()
        msg = world.recv(source=src, tag=tag)
        if tag == TAG_REPORT:
            world.send(sched.report(msg["trial"], msg["epoch"], msg["value"]), dest=src, tag=TAG_VERDICT)
            continue
        result = msg.get("result")
        if result and result["status"] == "preempted":
            preempted = True  # stays 'running' in the ledger: the next run continues it
        elif result:
            rec = sched.finish(msg["trial"], result)
            _say(_line(spec, rec))
        g = msg["group"]
        nxt = None if stop["signal"] or preempted else sched.next_trial(f"group-{g}", {"group": g})
        world.send(nxt, dest=src, tag=TAG_TRIAL)
        if nxt is None:
            active -= 1
        else:
            _say(f"trial {nxt['trial']:04d} started on group {msg['group']}: {nxt['params']}")
    finish_report(spec, sched.records, ledger_size=ledger.size())  # still under the ledger's lock
    return EXIT_PREEMPTED if preempted or stop["signal"] else 0


def _line(spec: SweepSpec, rec: dict[str, Any]) -> str:
    obj = rec.get("objective")
    obj_text = f"{spec.objective.key} {obj:.5g}" if isinstance(obj, (int, float)) else rec.get("error", "")
    return f"trial {rec['trial']:04d} {rec['status']} in {rec['wall_s']:.1f} s: {obj_text}"


def _group_loop(spec: SweepSpec, world: MPI.Comm, group: MPI.Comm, group_id: int) -> None:
    is_lead = group.Get_rank() == 0
    result, trial = None, None
    while True:
        record = None
        if is_lead:
            world.send({"group": group_id, "trial": trial, "result": result}, dest=0, tag=TAG_ASK)
            record = world.recv(source=0, tag=TAG_TRIAL)
        record = group.bcast(record, root=0)
        if record is None:
            return
        trial = record["trial"]

        def ask_verdict(epoch: int, accuracy: float, trial: int = trial) -> bool:
            world.send({"trial": trial, "epoch": epoch, "value": accuracy}, dest=0, tag=TAG_REPORT)
            return world.recv(source=0, tag=TAG_VERDICT)

        result = run_trial(spec, record, group, ask_verdict)


# ---------------------------------------------------------------------------------------------- array tasks


def _submitted(spec: SweepSpec) -> float | None:
    """When `hpcai sweep --cluster` submitted the array (budget.wall_s counts from there)."""
    try:
        return float(json.loads((spec.dir / "submit.json").read_text())["submitted"])
    except (OSError, ValueError, KeyError):
        return None


def run_task(spec: SweepSpec) -> int:
    """Every rank of one Slurm array task (an MPI world of ranks_per_trial ranks): take trials from the
    ledger under its lock until none is left, train each on this world, record the result."""
    from hpcai.sweep_cli import report_if_done

    world = MPI.COMM_WORLD.Dup()
    is_lead = world.Get_rank() == 0
    job = os.environ.get("SLURM_ARRAY_JOB_ID", "local")
    owner = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', f'{socket.gethostname()}-{os.getpid()}')}"
    ledger = Ledger(spec.dir)

    def stale(r: dict[str, Any]) -> bool:
        # Ours (a requeued task picks its own trial back up), or left by an earlier submission.
        return r.get("owner") == owner or not str(r.get("owner", "")).startswith(f"{job}_")

    if is_lead:
        try:
            with ledger.locked():  # tasks start together: one writes sweep.toml and builds the dataset
                _setup(spec)
        except UserError as e:
            sys.stderr.write(f"hpcai: error: {e}\n")
            world.bcast(False, root=0)
            return 2
    if not world.bcast(True if is_lead else None, root=0):
        return 2
    problem = None
    while True:
        record = None
        if is_lead:
            with ledger.locked():  # the ledger decides: a fresh Scheduler sees every trial taken so far
                sched = Scheduler(spec, ledger, stale, t0=_submitted(spec))
                record = sched.next_trial(owner, {"group": owner})
                if record is None:
                    try:
                        report_if_done(spec, ledger)  # the last task out writes best.json and the plots
                    except UserError as e:  # a full disk: said once, after the other ranks are told
                        problem = str(e)
        record = world.bcast(record, root=0)
        if record is None:
            break

        def ask_verdict(epoch: int, accuracy: float, n: int = record["trial"]) -> bool:
            with ledger.locked():
                return Scheduler(spec, ledger, lambda r: False).report(n, epoch, accuracy)

        result = run_trial(spec, record, world, ask_verdict)
        if result.get("status") == "preempted":  # every rank knows: the trial stays 'running', ours
            return EXIT_PREEMPTED
        if is_lead:
            with ledger.locked():
                rec = Scheduler(spec, ledger, lambda r: False).finish(record["trial"], result)
            _say(_line(spec, rec))
    if problem:
        sys.stderr.write(f"hpcai: error: {problem}\n")
        return 2
    return 0
