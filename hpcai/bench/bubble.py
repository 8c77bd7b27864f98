"""``hpcai bench bubble``: a pipeline's measured bubble against ``(S-1)/(m+S-1)``, S stages x m micro-batches.

    hpcai bench bubble [--stages 2,4] [--micro-batches 4,8,16] [--schedule 1f1b] [--json FILE]
    hpcai bench bubble --compute fixed [--how spin|sleep] [--us-per-sample 40]     # the pipeline alone
    hpcai bench bubble --drift-s 0                                                 # skip the drift probe

Each cell is one ``hpcai run jobs/digits_pipeline.toml`` on S ranks. From its summary.json:
``bubble_fraction`` (the part of the pipeline's step time, the first stage's schedule time, that a rank
spends outside forward and backward, averaged over ranks, steps 2 on) next to ``bubble_theory`` and
``excess_pp``, the difference in percentage points (the goal is within 2 on balanced stages).

The peer is the formula, which assumes every micro-batch's forward and backward take the same time on every
stage and that messages are free. Two kinds of stage:

- ``--compute mlp`` (default): a wide MLP (``--hidden``, 1024x9: 8 equal middle layers) cut by parameter
  count. Real kernels: the bubble includes the machine's compute jitter. In 1F1B the neighbouring stages run
  in lock step, so every micro-batch that is slow on one stage is a wait on the other.
- ``--compute fixed``: :mod:`hpcai.bench.fixed_cost` blocks that take a fixed time per sample (8 blocks, 8/S
  per stage). What is left above the formula is what the pipeline adds: receives, sends, Python between
  them. ``--how sleep`` lets more stages than cores run without queueing for a core (S = 4 on 2 cores).

The drift probe (``--drift-s``, 4 s by default, on machines with 2+ cores) runs the same matmul on every core
at once and reports how much each core's speed wanders over 20 ms windows, and how much the cores wander
together: independent drift is what lock-step stages pay for.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hpcai.bench.pipeline_runs import hidden_list, run_pipeline_job
from hpcai.errors import UserError

# --compute fixed: FixedCost blocks, at top-level indices 2..9 (after Flatten and the input Linear)
BLOCKS = 8


def _ints(text: str, flag: str, low: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if any(v < low for v in values):
        raise UserError(f"{flag}: every value must be at least {low}, got {text!r}")
    return values


def model_sets(args: argparse.Namespace, stages: int) -> list[str]:
    """The ``--set`` overrides that choose the stages' model and its cut."""
    if args.compute == "mlp":
        return ["parallel.split=params", f"model.hidden={hidden_list(args.hidden)}"]
    factory = f"{Path(__file__).resolve().with_name('fixed_cost.py')}:make_model"
    fields = f'blocks = {BLOCKS}, us_per_sample = {args.us_per_sample}, how = "{args.how}"'
    return [
        f"model.factory={json.dumps(factory)}",
        f"model.args={{{fields}}}",
        f"parallel.split={[2 + k * BLOCKS // stages for k in range(1, stages)]}",  # BLOCKS/S blocks a stage
    ]


def run_cell(tmp: Path, args: argparse.Namespace, stages: int, micro: int) -> dict:
    sets = [
        f"parallel.stages={stages}",
        f"parallel.micro_batches={micro}",
        f"parallel.schedule={args.schedule}",
        *model_sets(args, stages),
    ]
    run_dir = tmp / f"S{stages}-m{micro}"
    summary = run_pipeline_job(run_dir, stages, sets, args.batch, args.steps, args.data)
    p = summary["pipeline"]
    return {
        "stages": stages,
        "micro_batches": micro,
        "bubble_theory": p["bubble_theory"],
        "bubble_fraction": p["bubble_fraction"],
        "excess_pp": 100 * (p["bubble_fraction"] - p["bubble_theory"]),
        "stage_imbalance": p["stage_imbalance"],
        "step_ms": summary["train_s"] / max(1, summary["steps"]) * 1e3,
        "compute_s_per_rank": [r["compute_s"] for r in p["per_rank"]],
        "recv_wait_s_per_rank": [r["recv_wait_s"] for r in p["per_rank"]],
    }


# ----------------------------------------------------------------------------------- the drift probe


def _drift_worker(core: int, start: float, seconds: float, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.sched_setaffinity(0, {core})
    w, x = torch.randn(1024, 1024), torch.randn(64, 1024)
    y = torch.empty(64, 1024)
    while time.time() < start:  # the cores start together: their windows line up
        pass
    rows = []
    while time.time() < start + seconds:
        t0 = time.perf_counter()
        torch.mm(x, w, out=y)
        rows.append((time.time(), time.perf_counter() - t0))
    np.save(out, np.asarray(rows))


def core_drift(seconds: float, window_s: float = 0.02) -> dict:
    """A 64x1024 @ 1024x1024 matmul on every core at once: per core, the spread of its mean time per window
    (sd over mean); across cores, the correlation of those window means (1: they speed up and slow down
    together, 0: independently)."""
    cores = sorted(os.sched_getaffinity(0))
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="hpcai-drift-") as tmp:
        start = time.time() + 3.0  # room for the children to import torch
        files = [str(Path(tmp) / f"core{c}.npy") for c in cores]
        procs = [
            ctx.Process(target=_drift_worker, args=(c, start, seconds, f))
            for c, f in zip(cores, files, strict=True)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        runs = [np.load(f) for f in files]
    lo, hi = max(r[0, 0] for r in runs), min(r[-1, 0] for r in runs)
    edges = np.arange(lo, hi, window_s)
    means = []
    for r in runs:
        idx = np.searchsorted(r[:, 0], edges)
        means.append([r[a:b, 1].mean() if b > a else np.nan for a, b in zip(idx[:-1], idx[1:], strict=True)])
    m = np.asarray(means)
    ok = ~np.isnan(m).any(axis=0)
    m = m[:, ok]
    corr = np.corrcoef(m)
    pairs = [corr[i, j] for i in range(len(cores)) for j in range(i + 1, len(cores))]
    return {
        "cores": cores,
        "window_ms": window_s * 1e3,
        "matmul_ms_per_core": (m.mean(axis=1) * 1e3).tolist(),
        "window_sd_pct_per_core": (100 * m.std(axis=1) / m.mean(axis=1)).tolist(),
        "cross_core_corr": float(np.mean(pairs)) if pairs else float("nan"),
    }


# ----------------------------------------------------------------------------------- report


def format_text(report: dict) -> str:
    c = report["config"]
    lines = [
        f"pipeline bubble: {c['schedule']}, compute {c['compute']}, global batch {c['batch']}, "
        f"{c['steps']} steps, {report['cores']} cores",
        "",
        "| S | m | bubble_theory | bubble_fraction | excess (pp) | stage_imbalance | step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['stages']} | {r['micro_batches']} | {r['bubble_theory']:.3f} | {r['bubble_fraction']:.3f} "
            f"| {r['excess_pp']:+.1f} | {r['stage_imbalance']:.3f} | {r['step_ms']:.0f} |"
        )
    d = report.get("drift")
    if d:
        sd = ", ".join(f"{v:.1f}" for v in d["window_sd_pct_per_core"])
        ms = ", ".join(f"{v:.2f}" for v in d["matmul_ms_per_core"])
        lines += [
            "",
            f"core drift: matmul {ms} ms per core; over {d['window_ms']:.0f} ms windows each core's speed "
            f"varies by sd {sd}%, correlation across cores {d['cross_core_corr']:.2f}",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hpcai bench bubble", description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="2,4", help="comma list (default 2,4)")
    ap.add_argument("--micro-batches", default="4,8,16", help="comma list (default 4,8,16)")
    ap.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    ap.add_argument("--compute", choices=["mlp", "fixed"], default="mlp")
    ap.add_argument("--hidden", default="1024x9", help="--compute mlp: WIDTHxDEPTH or a comma list")
    ap.add_argument(
        "--how", choices=["spin", "sleep"], default="spin", help="--compute fixed: hold the core?"
    )
    ap.add_argument("--us-per-sample", type=float, default=40.0, help="--compute fixed: forward, per block")
    ap.add_argument("--batch", type=int, default=1024, help="global batch (default 1024)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--data", default="data/digits")
    ap.add_argument("--drift-s", type=float, default=4.0, help="seconds of the core drift probe (0: skip)")
    ap.add_argument("--json", type=Path, help="write the report here (and the table to FILE.md)")
    args = ap.parse_args(argv)
    args.stage_list = _ints(args.stages, "--stages", 2)
    args.micro_list = _ints(args.micro_batches, "--micro-batches", 1)
    if args.steps < 2:
        raise UserError("--steps: at least 2 (the bubble is measured from the second step on)")
    if args.us_per_sample <= 0:
        raise UserError("--us-per-sample: must be positive")
    for s in args.stage_list:
        for m in args.micro_list:
            if args.batch % m:
                raise UserError(f"--batch: {args.batch} does not split into {m} micro-batches")
        if args.compute == "fixed" and BLOCKS % s:
            raise UserError(
                f"--stages: --compute fixed has {BLOCKS} blocks, which {s} stages cannot share equally"
            )
    hidden_list(args.hidden)
    return args


def run(args: argparse.Namespace) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcai-bench-bubble-") as tmp:
        for s in args.stage_list:
            for m in args.micro_list:
                rows.append(run_cell(Path(tmp), args, s, m))
                r = rows[-1]
                print(
                    f"S={s} m={m:2d}: bubble {r['bubble_fraction']:.3f} theory {r['bubble_theory']:.3f} "
                    f"({r['excess_pp']:+.1f} pp) step {r['step_ms']:.0f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    drift = core_drift(args.drift_s) if args.drift_s > 0 and len(os.sched_getaffinity(0)) > 1 else None
    keys = (
        "stages",
        "micro_batches",
        "schedule",
        "compute",
        "hidden",
        "how",
        "us_per_sample",
        "batch",
        "steps",
    )
    return {
        "config": {k: getattr(args, k) for k in keys},
        "cores": os.cpu_count(),
        "rows": rows,
        "drift": drift,
    }


def main(argv: list[str] | None = None) -> int:
    from hpcai.bench import report_main

    status, _ = report_main("hpcai bench bubble", argv or [], parse_args, run, format_text)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
