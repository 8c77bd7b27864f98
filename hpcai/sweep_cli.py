"""``hpcai sweep``: launch a sweep (mpiexec or in-process), submit it as a Slurm array, or report on it.

    hpcai sweep jobs/digits_sweep.toml -n 5                      # 1 coordinator + 4 trial groups
    hpcai sweep jobs/digits_sweep.toml --set budget.trials=40    # more trials: resumes the same sweep dir
    hpcai sweep jobs/digits_sweep.toml --cluster local           # sbatch --array=0-K%M: `sweep --task`
    hpcai sweep jobs/digits_sweep.toml --report                  # the table, best.json and plots again

What a sweep leaves in SWEEP_DIR (runs/<name>/ or --sweep-dir): sweep.toml (resolved), trials.jsonl (one
line per trial event: params, objective, status running|complete|pruned|failed, wall_s, ranks),
reports.jsonl (per-epoch test accuracy), best.json, objective.png, params.png, trials/NNNN/ (run dirs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from hpcai.errors import UserError
from hpcai.fsio import atomic_write_bytes, atomic_write_text
from hpcai.sweep import FINAL, Ledger, SweepSpec, groups_for, load_sweep, prepare_dir, toml_override


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="hyperparameter search: trials in parallel under MPI, or a Slurm array")
    p.add_argument("sweep_file", metavar="SWEEP", help="sweep spec (TOML)")
    p.add_argument("-n", "--ranks", type=int, help="MPI ranks in all: 1 coordinator + groups of trials")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a sweep key")
    p.add_argument("--sweep-dir", help="sweep directory (default runs/<sweep.name>)")
    p.add_argument("--cluster", help="submit a Slurm job array with this profile (cluster/NAME.toml) instead")
    p.add_argument("--dry-run", action="store_true", help="with --cluster: write the script, do not submit")
    p.add_argument("--report", action="store_true", help="print the table and write best.json and plots")
    p.add_argument("--task", action="store_true", help=argparse.SUPPRESS)  # what each array task runs


def cmd_sweep(args: argparse.Namespace) -> int:
    from hpcai.launch import mpi_environment, run_ranks

    overrides = list(args.set) + ([toml_override("sweep.dir", args.sweep_dir)] if args.sweep_dir else [])
    spec = load_sweep(args.sweep_file, overrides)  # everything checked before a trial runs
    if args.report:
        ledger = Ledger(spec.dir)
        size = ledger.size()  # before reading: the records read hold at least this much of the ledger
        records = ledger.trials()
        if not records:
            raise UserError(f"{spec.dir}: no trials yet (no trials.jsonl)")
        finish_report(spec, records, ledger_size=size)
        return 0
    if args.task:
        from hpcai import sweep_comm

        return sweep_comm.run_task(spec)
    if args.cluster:
        return submit_array(spec, args.cluster, dry_run=args.dry_run)
    if mpi_environment():
        from hpcai import sweep_comm

        return sweep_comm.run_mpi(spec)
    if args.ranks is not None and args.ranks < 1:
        raise UserError(f"-n: must be >= 1, got {args.ranks}")
    ranks = args.ranks or 1 + spec.parallel.trials_at_once * spec.parallel.ranks_per_trial
    groups_for(spec, ranks)
    prepare_dir(spec)
    return run_ranks(ranks, ["-m", "hpcai.sweep", str(spec.dir / "sweep.toml")])


# ---------------------------------------------------------------------------------------------- Slurm


def submit_array(spec: SweepSpec, cluster: str, dry_run: bool = False, sbatch=None) -> int:
    """Render templates/array.sbatch.j2 (hpcai.slurm.render) for the trials still to run and sbatch it.

    Every task runs ``hpcai sweep SWEEP_DIR/sweep.toml --task`` on parallel.ranks_per_trial ranks; at most
    parallel.trials_at_once tasks run together (``--array=0-K%M``). ``sbatch`` is replaceable for tests.
    """
    from hpcai import slurm_cmd
    from hpcai.profiles import load_profile
    from hpcai.slurm import Context, render
    from hpcai.slurm_cli import record_submission
    from hpcai.spec import load_spec

    sweep_dir = prepare_dir(spec).resolve()
    records = Ledger(spec.dir).trials()
    left = spec.budget.trials - sum(r["status"] in FINAL for r in records.values())
    if left <= 0:
        print(f"# {spec.dir}: all {spec.budget.trials} trials are done; raise budget.trials to run more")
        return 0
    job = load_spec(
        spec.sweep.base,
        [
            *spec.sweep.set,
            toml_override("job.name", spec.sweep.name),
            toml_override("job.run_dir", str(sweep_dir)),
        ],
        ranks=spec.parallel.ranks_per_trial,
    )
    ctx = Context.here()
    command = [ctx.python, "-m", "hpcai", "sweep", str(sweep_dir / "sweep.toml"), "--task"]
    array = f"0-{left - 1}%{spec.parallel.trials_at_once}"
    text = render(job, load_profile(cluster), "array", context=ctx, array=array, command=command)
    script = sweep_dir / "sweep.sbatch"
    atomic_write_text(script, text)
    if dry_run:
        print(f"# dry run: wrote {script}; submit with: sbatch --parsable {script}")
        return 0
    job_id = (sbatch or slurm_cmd.sbatch)(str(script))
    record_submission(sweep_dir, job_id, cluster)
    print(job_id)
    return 0


# ---------------------------------------------------------------------------------------------- results


def best_trial(spec: SweepSpec, records: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The best complete trial (pruned trials stopped early: their objective is not comparable)."""
    done = [r for r in records.values() if r["status"] == "complete" and _num(r.get("objective"))]
    if not done:
        return None
    return min(done, key=lambda r: spec.sign() * r["objective"])


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def table(spec: SweepSpec, records: dict[int, dict[str, Any]]) -> str:
    names = list(spec.space)
    best = best_trial(spec, records)
    head = ["trial", "status", *names, spec.objective.key, "wall_s", "ranks"]
    rows = []
    for n, r in sorted(records.items()):
        obj = r.get("objective")
        mark = " *" if best is not None and n == best["trial"] else ""
        obj_text = (f"{obj:.5g}" if _num(obj) else "-") + mark
        params = [_fmt(r["params"].get(k)) for k in names]
        wall = f"{r.get('wall_s', 0.0):.1f}"
        rows.append([f"{n:04d}", r["status"], *params, obj_text, wall, str(r.get("ranks", "-"))])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *rows]]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v)


def report_if_done(spec: SweepSpec, ledger: Ledger) -> bool:
    """With the ledger's lock held: write the report if every trial has ended and best.json does not yet
    describe this state of the ledger. True when this caller wrote it.

    Array tasks end in any order and each checks on its way out; deciding under the lock, against the
    ledger size best.json records, makes exactly one of them write the report for the final ledger.
    """
    records = ledger.trials()
    if not records or any(r["status"] not in FINAL for r in records.values()):
        return False
    size = ledger.size()
    try:
        written = json.loads((spec.dir / "best.json").read_text(encoding="utf-8")).get("ledger_size")
    except (OSError, ValueError, AttributeError):
        written = None  # none yet, or unreadable: write it
    if written == size:
        return False
    finish_report(spec, records, ledger_size=size)
    return True


def finish_report(
    spec: SweepSpec, records: dict[int, dict[str, Any]], ledger_size: int | None = None
) -> dict[str, Any] | None:
    """best.json, objective.png, params.png in SWEEP_DIR and the table on the terminal.

    Each file is replaced whole through a temporary name of its own (:mod:`hpcai.fsio`): a reader never
    sees half a file, and two writers never share a temporary file. ``ledger_size`` (trials.jsonl's size
    when ``records`` were read) goes into best.json for :func:`report_if_done`.
    """
    best = best_trial(spec, records)
    counts = {s: sum(r["status"] == s for r in records.values()) for s in (*FINAL, "running")}
    print(table(spec, records))
    summary = {"objective": spec.objective.key, "direction": spec.objective.direction, "counts": counts,
               "best": best, "written": time.time(), "ledger_size": ledger_size}  # fmt: skip
    atomic_write_text(spec.dir / "best.json", json.dumps(summary, indent=2) + "\n")
    try:
        _plots(spec, records)
    except Exception as e:  # noqa: BLE001 - a plot must not fail a finished sweep
        print(f"sweep: plots not written: {type(e).__name__}: {e}", file=sys.stderr)
    if best:
        print(
            f"best: trial {best['trial']:04d} {spec.objective.key} {best['objective']:.5g} {best['params']}"
        )
    print(f"trials: {counts}; {spec.dir}/best.json, objective.png, params.png")
    return best


def _plots(spec: SweepSpec, records: dict[int, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcai.search import parse_space

    rs = [r for _, r in sorted(records.items()) if _num(r.get("objective"))]
    colours = {"complete": "tab:blue", "pruned": "tab:orange"}
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for status, c in colours.items():
        pts = [(r["trial"], r["objective"]) for r in rs if r["status"] == status]
        if pts:
            ax.scatter(*zip(*pts, strict=True), c=c, s=18, label=status)
    done = [r for r in rs if r["status"] == "complete"]
    if done:
        running, best = [], None
        for r in done:
            v = spec.sign() * r["objective"]
            best = v if best is None else min(best, v)
            running.append((r["trial"], spec.sign() * best))
        ax.step(*zip(*running, strict=True), where="post", c="k", lw=1, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(spec.objective.key)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_png(fig, spec.dir / "objective.png")

    params = parse_space(spec.space)
    fig, axes = plt.subplots(1, len(params), figsize=(3.2 * len(params), 3), dpi=100, squeeze=False)
    for ax, p in zip(axes[0], params, strict=True):
        for status, c in colours.items():
            sel = [r for r in rs if r["status"] == status]
            if p.type == "choice":
                xs = [[json.dumps(v) for v in p.values].index(json.dumps(r["params"][p.name])) for r in sel]
            else:
                xs = [r["params"][p.name] for r in sel]
            ax.scatter(xs, [r["objective"] for r in sel], c=c, s=18)
        if p.type == "choice":
            ax.set_xticks(range(len(p.values)), [json.dumps(v) for v in p.values], fontsize=7)
        elif p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(spec.objective.key)
    fig.tight_layout()
    _save_png(fig, spec.dir / "params.png")


def _save_png(fig, path) -> None:
    """Render in memory, then replace ``path`` whole (savefig would write through a symlink at ``path``)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
