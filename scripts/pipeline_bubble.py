"""Measured pipeline bubble against (S-1)/(m+S-1): S = 2, 4 stages x m = 4, 8, 16 micro-batches.

    python scripts/pipeline_bubble.py [--hidden 1024x9] [--batch 256] [--steps 12] [--json FILE]

Each run is ``hpcai run jobs/digits_pipeline.toml`` on S ranks with a wide MLP whose 8 middle layers are the
same size, cut by parameter count (balanced stages: 4 + 4 or 2 + 2 + 2 + 2 middle layers). The bubble is the
part of the pipeline's step time (the first stage's schedule time) a rank spends outside forward and backward,
averaged over ranks (summary.json bubble_fraction); it includes the Python and MPI cost of every send and
receive, which the formula counts as free, and the idle time of lighter stages (stage_imbalance: the slowest
stage's compute over the mean, minus 1), which the formula assumes away.
With more ranks than cores the ranks also share cores, and a rank waiting in MPI_Wait busy-polls one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="1024x9")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--micro-batches", default="4,8,16")
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--data", default="data/digits")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    width, depth = args.hidden.split("x")
    hidden = "[" + ", ".join([width] * int(depth)) + "]"
    env = dict(os.environ, OMP_NUM_THREADS="1", HPCAI_TTY="0")
    rows = []
    print(f"cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        for s in (int(v) for v in args.stages.split(",")):
            for m in (int(v) for v in args.micro_batches.split(",")):
                run_dir = Path(tmp) / f"s{s}m{m}"
                cmd = [sys.executable, "-m", "hpcai", "run", "jobs/digits_pipeline.toml", "-n", str(s)]
                cmd += ["--run-dir", str(run_dir), "--resume", "never"]
                for kv in (
                    f"parallel.stages={s}",
                    f"parallel.micro_batches={m}",
                    f"parallel.schedule={args.schedule}",
                    "parallel.split=params",
                    f"model.hidden={hidden}",
                    f"train.batch_size={args.batch}",
                    f"train.steps={args.steps}",
                    f"train.log_every={args.steps}",
                    f"data.path={json.dumps(args.data)}",
                    "checkpoint.final=false",
                ):
                    cmd += ["--set", kv]
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
                if proc.returncode:
                    print(proc.stderr[-3000:])
                    return 1
                summary = json.loads((run_dir / "summary.json").read_text())
                p = summary["pipeline"]
                per_rank = p["per_rank"]
                row = {
                    "stages": s,
                    "micro_batches": m,
                    "bubble_fraction": p["bubble_fraction"],
                    "bubble_theory": p["bubble_theory"],
                    "stage_imbalance": p["stage_imbalance"],
                    "step_ms": summary["train_s"] / summary["steps"] * 1e3,
                    "recv_wait_s_per_rank": [round(r["recv_wait_s"], 3) for r in per_rank],
                    "compute_s_per_rank": [round(r["compute_s"], 3) for r in per_rank],
                }
                rows.append(row)
                print(
                    f"S={s} m={m:2d}: bubble {row['bubble_fraction']:.3f} theory {row['bubble_theory']:.3f} "
                    f"imbalance {row['stage_imbalance']:.3f} step {row['step_ms']:.0f} ms  "
                    f"compute/rank {row['compute_s_per_rank']}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
