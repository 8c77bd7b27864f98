"""The ``hpcai`` command. Exit status: 0 success, 2 bad input (one line on stderr), else the job's failure.

hpcai run jobs/digits.toml                 # the spec's rank count (job.ranks)
hpcai run jobs/digits.toml -n 4 --set train.lr=0.05 --run-dir runs/try1
hpcai run                                  # the embedded default job (digits, 2 ranks)
hpcai validate jobs/digits.toml            # check the spec only; nothing is written
hpcai data build digits --out data/digits --shards 4
hpcai data build /tmp/x.npz --out /tmp/x -n 2 --shards 8 && hpcai data info /tmp/x
hpcai bench io /tmp/x --json io.json
hpcai bench allreduce -n 2 --sizes 64KiB,4MiB --json ar.json
hpcai run jobs/digits_pipeline.toml --trace runs/trace.json   # 2 pipeline stages; Perfetto trace + PNG
hpcai bench memory --json mem.json         # activation memory: none/recompute/offload, GPipe vs 1F1B
hpcai bench bubble --json bubble.json      # pipeline bubble vs (S-1)/(m+S-1), S = 2, 4 x m = 4, 8, 16
hpcai bench train jobs/digits.toml --target test_accuracy=0.97 --runs 5 -n 1,2 --json ttt.json --plot ttt.png
hpcai predict runs/digits --data data/digits --out preds.h5 -n 2
hpcai render jobs/digits.toml --cluster local          # the sbatch script (hpcai/slurm_cli.py has more)
hpcai submit jobs/digits.toml --cluster local [--dry-run]
hpcai status runs/digits
hpcai sweep jobs/digits_sweep.toml -n 3         # hyperparameter search (hpcai/sweep_cli.py has more)
hpcai bench search --seeds 10 --json search.json
python -m hpcai ...                        # the same
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hpcai import slurm_cli, sweep_cli
from hpcai.errors import UserError

# Each is hpcai/bench/<name>.py with main(argv) -> int.
BENCHES = [
    "allreduce",
    "bubble",
    "checkpoint",
    "ddp",
    "hardware",
    "io",
    "memory",
    "model",
    "ps",
    "search",
    "train",
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line and exit status 2 (its default status, our format)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job spec (TOML); omitted: the embedded default digits job")
    p.add_argument("-n", "--ranks", type=int, help="MPI ranks (overrides job.ranks)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key")
    p.add_argument("--run-dir", help="run directory (default runs/<job name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpcai", description="MPI batch jobs for training AI models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train a job on N ranks (mpiexec, or in-process under srun/mpiexec)")
    _add_job_args(run)
    run.add_argument(
        "--resume",
        default="auto",
        metavar="auto|never|force|PATH",
        help="auto (default): continue from the newest valid checkpoint in RUN_DIR/checkpoints; never: start "
        "fresh; force: like auto but accept a changed job spec; PATH: that checkpoint",
    )
    run.add_argument(
        "--inject-failure",
        metavar="step=K[,rank=R][,how=kill|hang|raise|nan]",
        help="rank R fails after step K: SIGKILL (default), stops communicating, raises, or its loss and "
        "gradients become NaN (tests)",
    )
    run.add_argument(
        "--slow-rank",
        metavar="RANK:FACTOR",
        help="train.strategy = 'ps': worker RANK sleeps so each step takes FACTOR times its compute",
    )
    run.add_argument(
        "--trace",
        metavar="FILE.json",
        help="pipeline runs: write every rank's forward/backward/send/recv/idle spans as a Chrome/Perfetto "
        "trace, and FILE.png, a timeline of the last steps",
    )
    insp = sub.add_parser(
        "inspect", help="what a checkpoint holds, or which one a run directory would resume"
    )
    insp.add_argument("target", help="a checkpoint file or a run directory")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    val = sub.add_parser("validate", help="check a job spec and print the resolved spec")
    _add_job_args(val)
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    from hpcai.data.commands import add_arguments

    add_arguments(data_sub)  # build, info
    bench = sub.add_parser("bench", help="benchmarks against the real peers", add_help=False)
    bench.add_argument("what", choices=BENCHES)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    from hpcai.predict import add_arguments as add_predict_arguments

    add_predict_arguments(sub.add_parser("predict", help="batch inference with a run's newest checkpoint"))
    slurm_cli.add_subcommands(sub, _add_job_args)
    sweep_cli.add_subcommand(sub)
    return parser


def _load(args: argparse.Namespace):
    from hpcai.spec import load_spec

    overrides = list(args.set)
    if args.run_dir:
        overrides.append(f"job.run_dir={_toml_str(args.run_dir, '--run-dir')}")
    if args.ranks is not None and args.ranks < 1:
        raise UserError(f"-n: must be >= 1, got {args.ranks}")
    return load_spec(args.job, overrides, ranks=args.ranks)


def _toml_str(s: str, option: str) -> str:
    """``s`` as a TOML string that reads back as exactly ``s`` (json.dumps is not one: it writes characters
    beyond the BMP as surrogate pairs, which TOML rejects). ``option`` names the flag in the error."""
    from hpcai.spec import toml_string

    try:
        return toml_string(s)
    except ValueError as e:
        raise UserError(f"{option}: {e}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from hpcai.launch import launcher_world_size, mpi_environment, run_ranks

    # A benchmark that launched us may have started the clock earlier (hpcai bench train: before our Python).
    t0 = float(os.environ.get("HPCAI_CLOCK_T0") or time.time())
    world = launcher_world_size() if mpi_environment() else None
    if world is not None and args.ranks is None:
        args.ranks = world  # started by srun/mpiexec: the spec is checked against the real world size
    elif world is not None and args.ranks != world:
        raise UserError(f"-n {args.ranks}: this MPI world has {world} ranks (started by srun/mpiexec)")
    spec = _load(args)  # validated before any rank starts: bad input writes nothing
    if args.resume not in ("auto", "never", "force"):
        from hpcai.checkpoint import read_checkpoint

        read_checkpoint(Path(args.resume))  # a bad PATH fails here, before any rank starts
        args.resume = str(Path(args.resume).resolve())
    if args.inject_failure:
        from hpcai.train import FailureInjection

        FailureInjection.parse(args.inject_failure)
        os.environ["HPCAI_INJECT_FAILURE"] = args.inject_failure
    if args.slow_rank:
        os.environ["HPCAI_SLOW_RANK"] = _slow_rank(args.slow_rank, spec)
    os.environ["HPCAI_RESUME"] = args.resume
    if args.trace:
        if spec.train.strategy != "pipeline":
            raise UserError("--trace: spans are recorded by train.strategy = 'pipeline' only")
        os.environ["HPCAI_TRACE"] = str(Path(args.trace).resolve())
    if mpi_environment():
        from hpcai.worker import run_worker

        return run_worker(spec, t0)  # rank 0 locks the run directory
    from hpcai.fsio import atomic_write_text
    from hpcai.launch import check_placeable, write_launch_file
    from hpcai.rundir import claim_run_dir

    check_placeable(spec.job.ranks)
    # The run directory is ours until mpiexec returns: a second run into it is refused, and the ranks read
    # the spec from a file only this launch wrote (job.toml is for people and `hpcai run RUN_DIR/job.toml`).
    with claim_run_dir(spec.run_dir):
        atomic_write_text(spec.run_dir / "job.toml", spec.to_toml())
        launch_file, digest = write_launch_file(spec)
        os.environ["HPCAI_T0"] = repr(t0)  # wall time counts from here, launch included
        try:
            return run_ranks(spec.job.ranks, ["-m", "hpcai.worker", str(launch_file), digest])
        finally:
            launch_file.unlink(missing_ok=True)


def _slow_rank(text: str, spec) -> str:
    """``RANK:FACTOR`` checked against the job: RANK a worker of a ps job, FACTOR >= 1."""
    rank, sep, factor = text.partition(":")
    try:
        r, f = int(rank), float(factor)
    except ValueError:
        raise UserError(f"--slow-rank: expected RANK:FACTOR (e.g. 4:4), got {text!r}") from None
    if not sep or f < 1:
        raise UserError(f"--slow-rank: expected RANK:FACTOR with FACTOR >= 1, got {text!r}")
    if spec.train.strategy != "ps":
        raise UserError("--slow-rank: only with train.strategy = 'ps'")
    if not spec.ps.servers <= r < spec.job.ranks:
        raise UserError(
            f"--slow-rank: rank {r} is not a worker "
            f"(workers are ranks {spec.ps.servers}..{spec.job.ranks - 1})"
        )
    return f"{r}:{f}"


def cmd_validate(args: argparse.Namespace) -> int:
    spec = _load(args)
    print(f"# {spec.source}: valid ({spec.job.ranks} ranks, run dir {spec.run_dir})")
    print(spec.to_toml(), end="")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from hpcai.inspect import inspect_target

    return inspect_target(Path(args.target), as_json=args.json)


def cmd_data(args: argparse.Namespace) -> int:
    from hpcai.data.commands import build_command, info_command

    return build_command(args) if args.data_command == "build" else info_command(args)


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"hpcai.bench.{args.what}").main(args.rest)


def cmd_predict(args: argparse.Namespace) -> int:
    from hpcai.predict import predict_command

    return predict_command(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "validate": cmd_validate,
        "inspect": cmd_inspect,
        "data": cmd_data,
        "bench": cmd_bench,
        "sweep": sweep_cli.cmd_sweep,
        "predict": cmd_predict,
    }.get(args.command) or slurm_cli.handler(args.command, _load)  # render/submit/status
    try:
        return handler(args)
    except UserError as e:
        from hpcai.launch import launcher_rank

        # Under srun/mpiexec every rank checks the same input: one of them says so.
        if launcher_rank() in (None, "0"):
            sys.stderr.write(f"hpcai: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
