"""`hpcai bench train`: time to train to a target quality, the MLPerf way, and how it scales with ranks.

    hpcai bench train jobs/digits.toml --target test_accuracy=0.97 -n 1,2,4 --json t.json --plot t.png
    hpcai bench train jobs/digits.toml --target test_accuracy=0.97 --runs 5 -n 1,2,4 --weak --json weak.json
    hpcai bench train jobs/cnn_synthetic.toml --target test_accuracy=0.95 --runs 3 -n 1,2 --set train.epochs=6

The MLPerf Training rules, as applied here:
- The clock starts before any data is touched: each run is `hpcai run JOB -n N` in a subprocess, and its clock
  starts right before that subprocess is launched (passed down as HPCAI_CLOCK_T0, so the wall_s of every
  metrics.jsonl record counts from there: interpreter start, imports, mpiexec, reading the shards included).
  Building a missing dataset (ETL) happens once, untimed, before the first run, as MLPerf allows.
- Evaluation time counts: runs use train.eval_every=1 and train.stop_at_accuracy=TARGET; time to train is the
  wall_s of the first epoch whose test_accuracy reaches the target, and the run stops there (the final
  checkpoint and summary written after that are not counted).
- N runs per rank count, seeds 0..N-1 (train.seed: initial parameters and shuffling). With N >= 3 the fastest
  and the slowest are dropped and the rest averaged; at most one run may miss the target (it counts as the
  slowest, so it is the one dropped); more misses report the rank count as not reached. With N < 3 nothing is
  dropped and no miss is allowed.
- Runs are interleaved (seed 0 at every rank count, then seed 1, ...): drifting load on a shared machine
  hits all rank counts alike. The load average before and after is recorded.

Scaling: strong (default) keeps the job's global batch at every rank count; --weak grows it with the ranks
(global batch = train.batch_size x N / N_min, learning rate unchanged). Speedup = T(N_min) / T(N);
efficiency = speedup / (N / N_min); the same for throughput (mean samples/s of the kept runs, evaluation
included).
Output: a markdown table on stdout, FILE.json and FILE.md with --json FILE.json, a PNG with --plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hpcai.bench import report_main
from hpcai.errors import UserError
from hpcai.rundir import acquire

PROG = "hpcai bench train"
METRICS = ("test_accuracy",)  # what the loop evaluates per epoch (train.eval_every)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UserError(message)  # one line, status 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("job", help="job spec (TOML)")
    ap.add_argument(
        "--target", default="test_accuracy=0.97", help="METRIC=VALUE (default test_accuracy=0.97)"
    )
    ap.add_argument("--runs", type=int, default=5, help="runs per rank count, seeds 0..runs-1 (default 5)")
    ap.add_argument("-n", "--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    ap.add_argument("--weak", action="store_true", help="weak scaling: the global batch grows with the ranks")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key")
    ap.add_argument("--out", type=Path, default=None, help="run directories (default runs/bench-train/<job>)")
    ap.add_argument("--json", type=Path, default=None, help="write FILE.json and FILE.md (the report)")
    ap.add_argument("--plot", type=Path, default=None, help="write time to train and speedup (PNG)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take (default 1800)")
    args = ap.parse_args(argv)
    metric, sep, value = args.target.partition("=")
    if not sep or metric not in METRICS:
        raise UserError(f"--target: expected {'|'.join(METRICS)}=VALUE, got {args.target!r}")
    try:
        args.target_value = float(value)
    except ValueError:
        raise UserError(f"--target: {value!r} is not a number") from None
    if not 0 < args.target_value <= 1:
        raise UserError(f"--target: {metric} must be in (0, 1], got {value}")
    args.metric = metric
    try:
        args.rank_counts = sorted({int(v) for v in args.ranks.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"-n: expected comma-separated integers, got {args.ranks!r}") from None
    if not args.rank_counts or args.rank_counts[0] < 1:
        raise UserError(f"-n: rank counts must be >= 1, got {args.ranks!r}")
    if args.runs < 1:
        raise UserError(f"--runs: must be >= 1, got {args.runs}")
    return args


# ------------------------------------------------------------------------------------------- the rules


def aggregate(times: list[float | None]) -> dict[str, Any]:
    """MLPerf aggregation of one configuration's runs: ``None`` is a run that missed the target.

    N >= 3: drop the fastest and the slowest (a miss counts as the slowest), average the rest; at most one
    miss. N < 3: average all, no miss allowed. Returns status 'reached' or 'not reached', the mean, the kept
    and dropped runs (by index).
    """
    n, misses = len(times), sum(t is None for t in times)
    order = sorted(range(n), key=lambda i: math.inf if times[i] is None else times[i])
    result: dict[str, Any] = {"runs": n, "misses": misses, "mean_s": None, "kept": [], "dropped": []}
    allowed = 1 if n >= 3 else 0
    if misses > allowed:
        result["status"] = "not reached"
        result["why"] = f"{misses} of {n} runs missed the target (at most {allowed} may)"
        return result
    kept = order[1:-1] if n >= 3 else order
    result["kept"], result["dropped"] = kept, [i for i in order if i not in kept]
    result["mean_s"] = sum(times[i] for i in kept) / len(kept)  # type: ignore[misc]
    result["status"] = "reached"
    return result


def scaling(rows: list[dict[str, Any]], key: str, is_time: bool) -> None:
    """Add ``key``_speedup and ``key``_efficiency over the first row: a time (lower is better) or a rate."""
    base = rows[0]
    for r in rows:
        factor = r["ranks"] / base["ranks"]
        a, b = base.get(key), r.get(key)
        if a is None or b is None or a <= 0 or b <= 0:
            r[f"{key}_speedup"] = r[f"{key}_efficiency"] = None
            continue
        speedup = a / b if is_time else b / a
        r[f"{key}_speedup"], r[f"{key}_efficiency"] = speedup, speedup / factor


def time_to_target(records: list[dict[str, Any]], metric: str, target: float) -> tuple[float, int] | None:
    """(wall_s, epoch) of the first metrics.jsonl record whose ``metric`` reaches ``target``; None if none."""
    for r in records:
        if r.get(metric) is not None and r[metric] >= target:
            return float(r["wall_s"]), int(r["epoch"]) + 1
    return None


# ------------------------------------------------------------------------------------------- running


def _run_one(args: argparse.Namespace, ranks: int, seed: int, batch: int, run_dir: Path) -> dict[str, Any]:
    """One `hpcai run` in a subprocess, clock started before launch; its time to target (or None)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # the bench's own directory: always a fresh run
    run_dir.mkdir(parents=True)
    acquire(run_dir, "hpcai bench train").release()  # marks it a run directory before bench.log goes in
    sets = [*args.set, f"train.seed={seed}", f"train.batch_size={batch}", "train.eval_every=1"]
    sets.append(f"train.stop_at_accuracy={args.target_value}")
    cmd = [sys.executable, "-m", "hpcai", "run", args.job, "-n", str(ranks), "--run-dir", str(run_dir)]
    cmd += ["--resume", "never"] + [a for s in sets for a in ("--set", s)]
    root = str(Path(__file__).resolve().parents[2])  # the subprocess imports this same hpcai
    env = dict(os.environ, HPCAI_TTY="0")  # OMP_NUM_THREADS: yours, else hpcai run's cores / ranks
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    t0 = time.time()
    env["HPCAI_CLOCK_T0"] = repr(t0)  # the clock starts here, before the run's Python even starts
    with open(run_dir / "bench.log", "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"run timed out after {args.timeout:.0f} s; see {run_dir / 'bench.log'}"
            ) from None
    if proc.returncode != 0:
        tail = (run_dir / "bench.log").read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"run failed (exit {proc.returncode}): {tail[0]} (log: {run_dir / 'bench.log'})")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((run_dir / "summary.json").read_text())
    hit = time_to_target(records, args.metric, args.target_value)
    return {
        "ranks": ranks,
        "seed": seed,
        "global_batch": batch,
        "time_to_target_s": hit[0] if hit else None,
        "epochs_to_target": hit[1] if hit else None,
        "best": max((r[args.metric] for r in records if args.metric in r), default=None),
        "run_wall_s": time.time() - t0,
        "samples_per_s": summary["samples_per_s"],
        "run_dir": str(run_dir),
    }


def _batches(args: argparse.Namespace, base_batch: int) -> dict[int, int]:
    n0 = args.rank_counts[0]
    out = {}
    for n in args.rank_counts:
        batch = base_batch * n // n0 if args.weak else base_batch
        if args.weak and base_batch * n % n0:
            raise UserError(f"--weak: global batch {base_batch} x {n} / {n0} is not an integer")
        out[n] = batch
    return out


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from hpcai.spec import load_spec

    base = load_spec(args.job, args.set)
    batches = _batches(args, base.train.batch_size)
    for n, batch in batches.items():  # every configuration validates before anything runs
        load_spec(args.job, [*args.set, f"train.batch_size={batch}", "train.eval_every=1"], ranks=n)
    data = Path(base.data.path)
    if not (data / "manifest.json").is_file() and base.data.source:
        from hpcai.data.etl import build_dataset

        print(f"{PROG}: building {data} from {base.data.source!r} (untimed data preparation)", flush=True)
        d = base.data
        build_dataset(d.source, data, d.shards, d.test_fraction, d.split_seed, log=lambda *_: None)
    out = args.out or Path("runs/bench-train") / base.job.name
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for seed in range(args.runs):  # interleaved: seed k at every rank count, then seed k + 1
        for n in args.rank_counts:
            r = _run_one(args, n, seed, batches[n], out / f"n{n}" / f"seed{seed}")
            runs.append(r)
            ttt = (
                f"{r['time_to_target_s']:.2f} s (epoch {r['epochs_to_target']})"
                if r["time_to_target_s"]
                else "missed"
            )
            print(
                f"  {n} rank(s), seed {seed}: {ttt}, best {r['best']}, {r['samples_per_s']:.0f} samples/s",
                flush=True,
            )
    rows = []
    for n in args.rank_counts:
        mine = [r for r in runs if r["ranks"] == n]
        agg = aggregate([r["time_to_target_s"] for r in mine])
        kept = [mine[i] for i in agg["kept"]] or mine
        epochs = [r["epochs_to_target"] for r in kept if r["epochs_to_target"]]
        rows.append(
            {
                "ranks": n,
                "global_batch": batches[n],
                **agg,
                "kept_seeds": [mine[i]["seed"] for i in agg["kept"]],
                "dropped_seeds": [mine[i]["seed"] for i in agg["dropped"]],
                "times_s": [r["time_to_target_s"] for r in mine],
                "epochs_mean": sum(epochs) / len(epochs) if epochs else None,
                "samples_per_s": sum(r["samples_per_s"] for r in kept) / len(kept),
            }
        )
    scaling(rows, "mean_s", is_time=True)
    scaling(rows, "samples_per_s", is_time=False)
    return {
        "job": args.job,
        "target": {args.metric: args.target_value},
        "mode": "weak" if args.weak else "strong",
        "runs_per_config": args.runs,
        "overrides": args.set,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "cores / ranks"),
        "rows": rows,
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------- reporting


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def format_markdown(report: dict[str, Any]) -> str:
    ((metric, target),) = report["target"].items()
    n = report["runs_per_config"]
    lines = [
        f"## Time to train: {report['job']}, {metric} >= {target} ({report['mode']} scaling)",
        "",
        f"{n} runs per rank count (seeds 0..{n - 1}); "
        + (
            "fastest and slowest dropped, mean of the rest; at most one miss. "
            if n >= 3
            else "fewer than 3 runs: mean of all, none dropped, no miss allowed. "
        )
        + "Clock from before launch, evaluation included. "
        f"Load average {report['load_average_before'][0]:.1f} before, {report['load_average_after'][0]:.1f} "
        f"after, {report['cpus']} CPUs, OMP_NUM_THREADS {report.get('omp_num_threads', '?')}.",
        "",
        "| ranks | global batch | status | time to train (s) | runs (s) | epochs | speedup | efficiency "
        "| samples/s | throughput speedup | throughput efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        runs = ", ".join("miss" if t is None else f"{t:.1f}" for t in r["times_s"])
        lines.append(
            f"| {r['ranks']} | {r['global_batch']} | {r['status']} | {_f(r['mean_s'])} | {runs} "
            f"| {_f(r['epochs_mean'], '.1f')} | {_f(r['mean_s_speedup'])} | {_f(r['mean_s_efficiency'])} "
            f"| {_f(r['samples_per_s'], '.0f')} | {_f(r['samples_per_s_speedup'])} "
            f"| {_f(r['samples_per_s_efficiency'])} |"
        )
    return "\n".join(lines) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        pts = [t for t in r["times_s"] if t is not None]
        ax1.scatter([r["ranks"]] * len(pts), pts, color="grey", s=12, zorder=2)
    done = [r for r in rows if r["mean_s"] is not None]
    ax1.plot([r["ranks"] for r in done], [r["mean_s"] for r in done], marker="o", label="MLPerf mean")
    ax1.set_xlabel("ranks")
    ax1.set_ylabel("time to train (s)")
    ((metric, target),) = report["target"].items()
    ax1.set_title(f"{Path(report['job']).stem}: {metric} >= {target}")
    ax1.legend()
    n0 = rows[0]["ranks"]
    ranks = [r["ranks"] for r in rows]
    ax2.plot(ranks, [n / n0 for n in ranks], "k--", label="ideal")
    for key, label in (("mean_s_speedup", "time to train"), ("samples_per_s_speedup", "throughput")):
        pts = [(r["ranks"], r[key]) for r in rows if r[key] is not None]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax2.set_xlabel("ranks")
    ax2.set_ylabel(f"speedup over {n0} rank(s)")
    ax2.set_title(f"{report['mode']} scaling")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(ranks)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Entry point of `hpcai bench train`; returns the exit status (2: bad input, 1: a run failed)."""
    return report_main(PROG, argv, parse_args, run_bench, format_markdown, write_plot)[0]
