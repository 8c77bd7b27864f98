"""What every rank runs. Started by ``hpcai run`` under mpiexec, or in-process under srun/mpiexec::

    hpcai run jobs/digits.toml -n 2           # runs: mpiexec -n 2 python -m hpcai.worker LAUNCH_FILE SHA256
    mpiexec -n 2 python -m hpcai.worker runs/digits/job.toml   # by hand: rank 0 locks the run directory
    mpiexec -n 4 hpcai run jobs/digits.toml   # already under MPI: every rank runs in-process
    srun --mpi=pmi2 -n 4 hpcai run jobs/digits.toml

An exception on any rank prints ``hpcai: rank R: <message>`` once (the traceback goes to that rank's log) and
aborts the whole MPI job, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from hpcai.errors import UserError
from hpcai.fsio import atomic_write_text
from hpcai.spec import JobSpec, load_spec


def _device(spec: JobSpec, topo):
    """cuda:<local rank> (modulo the GPUs this node has) for train.device = "cuda", else the CPU."""
    import torch

    if spec.train.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{spec.source}: train.device: 'cuda' asked for, but torch sees no GPU on this node")
    return torch.device(f"cuda:{topo.local_rank % torch.cuda.device_count()}")


def _ensure_dataset(spec: JobSpec, say) -> None:
    """Rank 0 builds the dataset if it is missing and the spec names a source."""
    from hpcai.data.etl import build_dataset

    path = Path(spec.data.path)
    if (path / "manifest.json").is_file():
        return
    if not spec.data.source:
        raise UserError(f"{spec.source}: data.path: no dataset at {path}")
    say(f"dataset {path} missing: building it from {spec.data.source!r}")
    build_dataset(
        spec.data.source, path, spec.data.shards, spec.data.test_fraction, spec.data.split_seed, log=say
    )


def _select_checkpoint(spec: JobSpec, mode: str, say):
    """Rank 0: the checkpoint to resume from (or None) under ``--resume auto|never|force|PATH``."""
    from hpcai import checkpoint as ckpt

    run_dir = spec.run_dir
    if mode == "never":
        if ckpt.list_checkpoints(run_dir):
            raise UserError(
                f"{ckpt.checkpoint_dir(run_dir)}: holds checkpoints of an earlier run; --resume never would "
                "mix two runs in one directory: choose another --run-dir or delete them"
            )
        return None
    if mode in ("auto", "force"):
        found = ckpt.find_resumable(run_dir, warn=say)
        if found is None:
            return None
        path, payload = found
    else:
        path = Path(mode)
        payload = ckpt.read_checkpoint(path)
    saved = json.loads(payload.attrs["spec"])
    diffs = ckpt.spec_differences(saved, spec.to_dict())
    if diffs and mode != "force":
        raise ckpt.CheckpointError(
            f"{path}: written by a different job spec ({'; '.join(diffs)}); "
            "use --resume force to continue with the new spec, or another --run-dir"
        )
    if spec.train.batch_size != saved.get("train", {}).get("batch_size"):
        raise ckpt.CheckpointError(f"{path}: train.batch_size differs; the epoch position cannot carry over")
    say(f"resuming from {path} (step {payload.step}, written by {payload.attrs['world_size']} ranks)")
    return path


# Startup phases, numbered alike on every rank: a stall report names a peer's phase by its number. Each
# phase that waits for another rank's work comes after that work's phase (rank 0 builds the dataset in
# 'dataset'; the others wait for its decision in 'model build').
STARTUP_PHASES = (
    "setup",
    "dataset",
    "checkpoint selection",
    "model build",
    "strategy setup",
    "checkpoint load",
    "parameter broadcast",
    "training start",
)
PATIENT_PHASES = ("dataset", "checkpoint selection")  # rank 0's, as long as the data: said, never aborted


def _checkpoint_written_since(run_dir: Path, step: int) -> str | None:
    """The newest checkpoint of this run (a step after ``step``, where it started), or None."""
    from hpcai import checkpoint as ckpt

    paths = ckpt.list_checkpoints(run_dir)
    return paths[-1].name if paths and int(paths[-1].stem.split("-")[-1]) > step else None


def train_job(
    spec: JobSpec,
    topo,
    t0: float,
    on_eval=None,
    run_dir_locked: bool = False,
    startup=None,
    signals=None,
) -> dict | None:
    """Train ``spec`` on the ranks of ``topo`` (any communicator: COMM_WORLD, or a sweep's sub-communicator).

    Returns the summary on the topology's rank 0, None elsewhere. ``on_eval(epoch, test_accuracy) -> bool``
    is called on every rank after each evaluation (``train.eval_every``); True stops training early.
    The topology's rank 0 holds the run directory's lock for the run (:mod:`hpcai.rundir`) unless
    ``run_dir_locked`` says the ``hpcai run`` launcher already holds it; the other ranks write nothing there
    before rank 0 has it (they wait for its resume decision).

    ``startup`` (:class:`hpcai.comm.stall.StartupPhases` over STARTUP_PHASES) and ``signals``
    (:class:`hpcai.comm.abort.JobSignals`) come from :func:`run_worker`; without them (a sweep's trial)
    the startup watch starts here and signals only ask for a stop, as before.
    """
    from hpcai.rundir import acquire

    if startup is None:  # collective: every rank of topo arrives here together
        from hpcai.comm.stall import StartupPhases

        cm = spec.comm
        startup = StartupPhases(
            topo.world, STARTUP_PHASES, cm.stall_timeout_s, cm.stall_abort, PATIENT_PHASES
        )
    lock = acquire(spec.run_dir) if topo.is_root and not run_dir_locked else None
    try:
        return _train_job(spec, topo, t0, on_eval, startup, signals)
    except BaseException:
        startup.abandon()  # this rank is failing: it reports no stall of the others
        raise
    finally:
        if lock is not None:
            lock.release()


def _train_job(spec: JobSpec, topo, t0: float, on_eval, startup, signals) -> dict | None:
    if spec.train.strategy == "ps":  # servers and workers: their own loop (hpcai/parallel/param_server.py)
        from hpcai.parallel.param_server import train_ps

        startup.close()  # its phases are train_ps's own
        return train_ps(spec, topo, t0)
    import numpy as np
    import torch

    from hpcai import checkpoint as ckpt
    from hpcai.data.loader import BatchLoader
    from hpcai.data.shards import ShardedDataset
    from hpcai.models import build_model, model_skeleton
    from hpcai.parallel.data_parallel import DataParallel
    from hpcai.report import Reporter, rank_logger, truncate_metrics, versions, write_run_outputs
    from hpcai.train import FailureInjection, Trainer, total_steps

    if on_eval is None and spec.train.stop_at_accuracy > 0:  # time to train: stop once the target is reached
        target = spec.train.stop_at_accuracy
        on_eval = lambda _epoch, accuracy: accuracy >= target  # noqa: E731
    run_dir = spec.run_dir
    resume_mode = os.environ.get("HPCAI_RESUME", "auto")
    inject = os.environ.get("HPCAI_INJECT_FAILURE")
    inject = FailureInjection.parse(inject) if inject else None
    resume_path = None
    startup.enter("dataset")
    if topo.is_root:
        atomic_write_text(run_dir / "job.toml", spec.to_toml())
        _ensure_dataset(spec, print)
    startup.enter("checkpoint selection")
    if topo.is_root:
        resume_path = _select_checkpoint(spec, resume_mode, print)
        if resume_path is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    startup.enter("model build")  # the others wait for rank 0's decision here
    resume_path = topo.world.bcast(str(resume_path) if resume_path else None, root=0)  # a path: metadata
    logger = rank_logger(run_dir, topo.rank)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    logger.info(
        f"start: world {topo.world_size}, host {platform.node()}, pid {os.getpid()}, job {spec.source}, "
        f"SLURM_RESTART_COUNT={restarts}, resume={resume_path or 'none'}"
    )

    if signals is not None:  # run_worker's: a SIGUSR1 since the start is remembered for the first step
        stop = signals.stop
    else:  # a sweep's trial: stop requests (Slurm's warning, a polite kill): checkpoint, exit 75
        stop = threading.Event()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(spec.train.seed)  # rank 0's initial parameters are broadcast anyway
    # Python's and numpy's global generators too (a user's augmentation may draw from them), a stream per
    # rank: the run is repeatable and every rank's state in a checkpoint is the same bits run after run.
    random.seed(f"{spec.train.seed}:{topo.rank}")
    np.random.seed([spec.train.seed, topo.rank])
    data = ShardedDataset(spec.data.path)
    if spec.train.strategy == "pipeline":
        from hpcai.parallel.pipeline_parallel import apply_pipeline_parallel

        # A built-in model comes as a meta-device skeleton: this rank allocates its own stage's blocks only.
        whole = model_skeleton(spec.model, data.sample_shape, data.num_classes)
        if whole is None:  # a user's factory: built whole, cut below
            whole = build_model(spec.model, data.sample_shape, data.num_classes, seed=spec.train.seed)
        n_params = sum(p.numel() for p in whole.parameters())
        example = torch.from_numpy(data.splits["train"].read(np.arange(2))[0])
        startup.enter("strategy setup")
        model, strategy = apply_pipeline_parallel(
            whole, topo, spec.parallel, example, spec.train.seed, spec.comm
        )
        del whole
    else:
        model = build_model(spec.model, data.sample_shape, data.num_classes, seed=spec.train.seed)
        n_params = sum(p.numel() for p in model.parameters())
        model = model.to(_device(spec, topo))
        startup.enter("strategy setup")
        strategy = DataParallel(topo, grad_accum=spec.train.grad_accum, comm=spec.comm)
    loader = BatchLoader(
        data.splits["train"],
        spec.train.batch_size,
        topo.dp_rank,
        topo.dp_size,
        spec.train.seed,
        spec.data.prefetch,
    )
    startup.enter("checkpoint load")
    payload = (
        ckpt.read_checkpoint(Path(resume_path), verify=False) if resume_path else None
    )  # rank 0 verified
    if payload is not None and topo.is_root:
        truncate_metrics(run_dir, payload.step, print)  # before the reporter appends to it
    reporter = Reporter(run_dir, topo.is_root, logger, total_steps(spec.train, loader.steps_per_epoch), t0)
    writer = ckpt.CheckpointWriter(run_dir, spec.checkpoint.keep, spec.checkpoint.async_save, log=logger.info)
    startup.enter("parameter broadcast")  # Trainer: the strategy's prepare broadcasts rank 0's parameters
    trainer = Trainer(spec, model, strategy, loader, reporter, topo.rank, writer, stop, inject, on_eval)
    startup.enter("training start")
    if payload is not None:
        trainer.restore(payload)
    reporter.say(
        f"{spec.job.name}: {type(model).__name__} with {n_params:,} parameters, {topo.describe()}, "
        f"global batch {spec.train.batch_size}, {len(data.splits['train'])} training samples -> {run_dir}"
    )
    startup.close()  # collective: its barrier is the last watched wait of startup
    if signals is not None:  # inside the loop the first SIGTERM/SIGINT asks for a checkpoint at the next step
        start = trainer.step
        signals.checkpoint = lambda: _checkpoint_written_since(run_dir, start)
        signals.in_loop = lambda: trainer.step < trainer.n_steps and not trainer.stopped_early
        signals.where = lambda: "during training" if signals.in_loop() else "after training"
    try:
        result = trainer.fit(data.splits["test"])
    finally:
        if signals is not None:
            signals.in_loop = lambda: False  # the final evaluation and summary: a signal ends the job
        reporter.close()
    digests = strategy.params_digest(model)
    comm_stats = strategy.stats() if hasattr(strategy, "stats") else {}
    pipeline = strategy.report() if hasattr(strategy, "report") else None  # collective
    trace = os.environ.get("HPCAI_TRACE")
    if trace and hasattr(strategy, "write_trace"):
        strategy.write_trace(Path(trace))  # collective: spans gathered to rank 0
    if hasattr(strategy, "close"):
        strategy.close()
    data.close()
    if topo.is_root:
        same = getattr(strategy, "replicas_identical", None)
        identical = same(digests) if same is not None else len(set(digests)) == 1
        summary = {
            "job": spec.job.name,
            "world_size": topo.world_size,
            "strategy": spec.train.strategy,
            "steps": result.steps,
            "epochs": result.epochs,
            "final_loss": result.final_loss,
            "test_accuracy": result.test_accuracy,
            "wall_s": time.time() - t0,
            "train_s": result.train_seconds,
            "samples_per_s": result.samples_per_s,
            "data_wait_fraction": result.data_wait_s / max(result.train_seconds, 1e-9),
            "dataset": str(Path(spec.data.path).resolve()),
            "model_parameters": n_params,
            "params_sha256": digests,
            "params_identical_across_ranks": identical,
            "spec_sha256": spec.spec_hash(),
            "resumed_from_step": result.resumed_from,
            "stopped_early": result.stopped_early,
            "skipped_steps": result.skipped_steps,
            "restarts": restarts,
            "checkpoints": result.checkpoints,
            **comm_stats,
            **(
                {
                    "bubble_fraction": pipeline["bubble_fraction"],
                    "bubble_theory": pipeline["bubble_theory"],
                    "pipeline": pipeline,
                }
                if pipeline is not None
                else {}
            ),
            "versions": versions(),
        }
        write_run_outputs(run_dir, summary, f"{spec.job.name}: {topo.describe()}")
        reporter.say(
            f"done: {result.steps} steps, final loss {result.final_loss:.4f}, test accuracy "
            f"{result.test_accuracy:.4f}, {summary['wall_s']:.1f} s wall, "
            f"{result.samples_per_s:.0f} samples/s"
        )
        if not identical:
            raise RuntimeError(f"parameters differ across ranks after training: {digests}")
        return summary
    return None


USER_ERROR_GRACE_S = 2.0  # how long ranks other than 0 wait before reporting bad input themselves


def run_worker(spec: JobSpec, t0: float | None = None, run_dir_locked: bool = False) -> int:
    """Run the job on this rank; on any error, print it with the rank and abort every rank.

    ``run_dir_locked``: the ``hpcai run`` launcher holds the run directory's lock (it started us)."""
    t0 = t0 if t0 is not None else float(os.environ.get("HPCAI_T0", time.time()))
    from mpi4py import MPI

    from hpcai.comm.abort import Interrupted, JobSignals, abort_job
    from hpcai.comm.stall import StartupPhases
    from hpcai.train import NonFiniteError, Preempted

    rank = MPI.COMM_WORLD.Get_rank()
    # First thing: from here on a SIGUSR1 is remembered, and a SIGTERM/SIGINT outside the loop ends the job.
    signals = JobSignals(rank, MPI.COMM_WORLD.Get_size())
    try:
        # The stall watch starts with the job, while every rank arrives here together (it is collective).
        cm = spec.comm
        startup = StartupPhases(
            MPI.COMM_WORLD, STARTUP_PHASES, cm.stall_timeout_s, cm.stall_abort, PATIENT_PHASES
        )
        signals.where = startup.describe
        startup.enter("setup")
        from hpcai.topology import Topology

        if spec.train.strategy == "ps":
            topo = Topology.param_server(spec.ps.servers)
        elif spec.train.strategy == "pipeline":
            topo = Topology.pipeline(spec.parallel.stages, spec.parallel.data_replicas)
        else:
            topo = Topology.data_parallel()
        train_job(spec, topo, t0, run_dir_locked=run_dir_locked, startup=startup, signals=signals)
    except Preempted as e:  # every rank agreed to stop at this step: a clean, collective exit
        if rank == 0:
            sys.stderr.write(f"hpcai: {e}; run the same command again to continue\n")
        return e.exit_code
    except NonFiniteError as e:  # divergence (train.on_nonfinite = "stop"): exit 4, no checkpoint of it
        if e.collective:  # every rank raised it at the same step: rank 0 says it, everyone leaves
            if rank == 0:
                sys.stderr.write(f"hpcai: error: {e}\n")
            return e.exit_code
        signals.hold()
        line = f"hpcai: rank {rank}: error: {e}"
        if MPI.COMM_WORLD.Get_size() > 1:
            abort_job(line, e.exit_code)
        sys.stderr.write(line + "\n")
        return e.exit_code
    except Interrupted as e:  # a signal ends the job now: one line, 75 / 130 / 143, every rank ends
        return signals.end_job(e.signum)
    except BaseException as e:  # noqa: BLE001 - every failure must end every rank
        signals.hold()  # this error ends the job: a signal now neither raises nor says it a second time
        code = e.exit_code if isinstance(e, UserError) else 1
        if isinstance(e, KeyboardInterrupt):
            code, msg = 130, "interrupted"
        elif isinstance(e, UserError):
            msg = str(e)
        else:
            msg = f"{type(e).__name__}: {e}"
        hint = ""
        if not isinstance(e, UserError):  # bad input needs no traceback (and a busy run dir is not ours)
            where = spec.run_dir / "logs" / f"rank-{rank}.log"
            try:
                where.parent.mkdir(parents=True, exist_ok=True)
                with open(where, "a") as f:
                    f.write(f"rank {rank} failed:\n{traceback.format_exc()}")
                hint = f" (traceback in {where})"
            except OSError:
                hint = "\n" + traceback.format_exc()
        line = f"hpcai: rank {rank}: error: {msg}{hint}"
        if MPI.COMM_WORLD.Get_size() > 1:  # ends every rank of the job: nobody hangs in a collective
            if isinstance(e, UserError) and rank != 0:
                # Bad input usually fails every rank alike: give rank 0 the moment it needs to say it and
                # abort the job, so the user reads the line once. A rank that failed alone still speaks.
                time.sleep(USER_ERROR_GRACE_S)
            abort_job(line, code)
        sys.stderr.write(line + "\n")
        return code
    finally:
        signals.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hpcai.worker LAUNCH_FILE SHA256`` (what ``hpcai run`` starts: the spec it resolved, in a
    file only it wrote, and the lock already held) or ``python -m hpcai.worker JOB.toml`` (rank 0 locks)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        sys.stderr.write("usage: python -m hpcai.worker RUN_DIR/job.toml | LAUNCH_FILE SHA256\n")
        return 2
    try:
        if len(argv) == 2:
            from hpcai.launch import read_launch_file

            spec = read_launch_file(argv[0], argv[1])
        else:
            spec = load_spec(argv[0])
    except UserError as e:
        if os.environ.get("PMI_RANK", "0") == "0":  # every rank reads the same file: one of them says so
            sys.stderr.write(f"hpcai: error: {e}\n")
        return 2
    return run_worker(spec, run_dir_locked=len(argv) == 2)


if __name__ == "__main__":
    sys.exit(main())
