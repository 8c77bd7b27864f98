"""``hpcai bench memory``: a pipeline's activation memory and step time; none/recompute/offload, GPipe/1F1B.

    hpcai bench memory [--stages 2] [--micro-batches 8] [--hidden 1024x6] [--batch 256] [--steps 8]
                       [--data data/digits] [--json FILE]

Six short runs of jobs/digits_pipeline.toml (a wide MLP so activations matter), one per schedule x memory
mode, each in its own processes (peak RSS is a per-process high-water mark). From each run's summary.json:

- ``peak_activation_MB``: the most bytes a stage held for backward at once, counted exactly by a saved-tensor
  hook (each saved tensor once, parameters excluded; with recompute, the stage inputs checkpoint keeps). Per
  stage, the first stage's first.
- ``max_in_flight``: the most micro-batches between forward and backward, per stage (GPipe m, 1F1B S - s).
- ``peak_rss_MB``: the largest ``ru_maxrss`` of a stage's rank: the whole process (torch, the model, buffers),
  so activation savings show as a small part of it on a model this size.
- ``step_ms``: training time per step (includes the recompute's second forward).

Offload moves saved activations to host memory: on a CPU-only machine they already are there, so it runs the
hook and moves nothing (its memory equals ``none``; offloaded_MB says what would have moved from a GPU: 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hpcai.bench.pipeline_runs import hidden_list, run_pipeline_job
from hpcai.errors import UserError

MODES = {"none": [], "recompute": ["parallel.recompute=true"], "offload": ["parallel.offload=true"]}


def run_one(tmp: Path, args: argparse.Namespace, schedule: str, mode: str) -> dict:
    sets = [
        f"parallel.schedule={schedule}",
        f"parallel.stages={args.stages}",
        f"parallel.micro_batches={args.micro_batches}",
        "parallel.split=params",
        f"model.hidden={hidden_list(args.hidden)}",
        *MODES[mode],
    ]
    run_dir = tmp / f"{schedule}-{mode}"
    try:
        summary = run_pipeline_job(run_dir, args.stages, sets, args.batch, args.steps, args.data)
    except RuntimeError as e:
        raise UserError(f"bench memory: {e}") from None
    p = summary["pipeline"]
    mb = 1 << 20
    return {
        "schedule": schedule,
        "mode": mode,
        "step_ms": summary["train_s"] / max(1, summary["steps"]) * 1e3,
        "peak_activation_MB": [b / mb for b in p["peak_activation_bytes_per_stage"]],
        "max_in_flight": p["max_in_flight_per_stage"],
        "peak_rss_MB": [b / mb for b in p["peak_rss_bytes_per_stage"]],
        "offloaded_MB": sum(r["offloaded_bytes"] for r in p["per_rank"]) / mb,
        "bubble_fraction": p["bubble_fraction"],
        "bubble_theory": p["bubble_theory"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hpcai bench memory", description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--hidden", default="1024x6", help="WIDTHxDEPTH or a comma list (default 1024x6)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--data", default="data/digits")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcai-bench-memory-") as tmp:
        for schedule in ("gpipe", "1f1b"):
            for mode in MODES:
                rows.append(run_one(Path(tmp), args, schedule, mode))
                r = rows[-1]
                print(
                    f"{schedule:5s} {mode:9s} step {r['step_ms']:7.1f} ms  activations/stage MB "
                    f"{', '.join(f'{v:.2f}' for v in r['peak_activation_MB'])}  in flight "
                    f"{r['max_in_flight']}  RSS/stage MB {', '.join(f'{v:.0f}' for v in r['peak_rss_MB'])}  "
                    f"offloaded {r['offloaded_MB']:.2f} MB",
                    flush=True,
                )
    if args.json:
        meta = {k: getattr(args, k) for k in ("stages", "micro_batches", "hidden", "batch", "steps")}
        Path(args.json).write_text(json.dumps({"config": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
