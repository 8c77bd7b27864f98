"""`hpcai bench hardware`: one job on the CPU and on a GPU, samples/s and the ratio (as MLPerf tables do).

    hpcai bench hardware jobs/cnn_synthetic.toml --json hw.json
    hpcai bench hardware jobs/transformer_tokens.toml --steps 100 -n 1 --devices cpu,cuda
    hpcai bench hardware jobs/digits.toml --set model.name=cnn --threads 8

Each device is one `hpcai run JOB -n N --set train.device=DEV --set train.steps=K` in a subprocess (no
evaluation, no checkpoints); "cuda" is skipped, with the reason, where torch sees no GPU here. Reported per
device: steady samples/s (the median of the metrics.jsonl windows after the first, which holds warm-up:
allocator, cuDNN autotuning, the loader's first reads) and the run's overall samples/s. The CPU run gets
--threads intra-op threads per rank (default: all cores / N), so it uses the whole host, as the GPU run does.
For the model zoo at fixed reference sizes without MPI or datasets, see scripts/gpu_hardware_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from hpcai.bench import report_main
from hpcai.errors import UserError

PROG = "hpcai bench hardware"
DEVICES = ("cpu", "cuda")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UserError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("job", help="job spec (TOML)")
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated, from cpu,cuda (default both)")
    ap.add_argument("-n", "--ranks", type=int, default=1, help="ranks per run (default 1: one device)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per rank (default cores / ranks)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-hardware"), help="run directories")
    ap.add_argument("--json", type=Path, default=None, help="write the report here (and FILE.md)")
    args = ap.parse_args(argv)
    args.device_list = [d.strip() for d in args.devices.split(",") if d.strip()]
    bad = [d for d in args.device_list if d not in DEVICES]
    if bad or not args.device_list:
        raise UserError(f"--devices: {', '.join(bad) or 'empty'}; choose from {', '.join(DEVICES)}")
    if args.ranks < 1 or args.steps < 2 or args.threads < 0:
        raise UserError("need -n >= 1, --steps >= 2 and --threads >= 0")
    return args


def steady_rate(records: list[dict[str, Any]]) -> float | None:
    """Median samples/s of the logged windows after the first (warm-up); None with fewer than two windows."""
    rates = [r["samples_per_s"] for r in records[1:] if "samples_per_s" in r]
    return statistics.median(rates) if rates else None


def cuda_available() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "torch sees no GPU (torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)


def _run(args: argparse.Namespace, device: str) -> dict[str, Any]:
    run_dir = args.out / device
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [*args.set, f"train.device={device}", f"train.steps={args.steps}", "train.eval_every=0"]
    sets += ["checkpoint.final=false", "checkpoint.every_seconds=0"]
    cmd = [sys.executable, "-m", "hpcai", "run", args.job, "-n", str(args.ranks), "--run-dir", str(run_dir)]
    cmd += ["--resume", "never"] + [a for s in sets for a in ("--set", s)]
    root = str(Path(__file__).resolve().parents[2])
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.ranks)
    env = dict(os.environ, HPCAI_TTY="0", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
        return {"device": device, "status": "failed", "why": f"exit {proc.returncode}: {last[0]}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "device": device,
        "status": "ok",
        "threads_per_rank": threads if device == "cpu" else None,
        "steady_samples_per_s": steady_rate(records),
        "overall_samples_per_s": summary["samples_per_s"],
        "steps": summary["steps"],
        "train_s": summary["train_s"],
    }


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from hpcai.spec import load_spec

    spec = load_spec(args.job, args.set, ranks=args.ranks)  # a bad job fails here, before any run
    rows = []
    for device in args.device_list:
        if device == "cuda":
            ok, what = cuda_available()
            if not ok:
                rows.append({"device": "cuda", "status": "skipped", "why": what})
                print(f"{PROG}: cuda skipped: {what}", flush=True)
                continue
        rows.append(_run(args, device))
        print(f"{PROG}: {rows[-1]}", flush=True)
    cpu = next((r for r in rows if r["device"] == "cpu" and r["status"] == "ok"), None)
    for r in rows:
        base = cpu["steady_samples_per_s"] if cpu else None
        rate = r.get("steady_samples_per_s")
        r["vs_cpu"] = rate / base if rate and base else None
    return {
        "job": args.job,
        "model": spec.model.name,
        "ranks": args.ranks,
        "global_batch": spec.train.batch_size,
        "steps": args.steps,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rows": rows,
    }


def format_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"## Hardware: {report['job']} ({report['model']}, global batch {report['global_batch']}, "
        f"{report['ranks']} rank(s), {report['steps']} steps; {report['cpus']} CPUs, load average "
        f"{report['load_average'][0]:.1f})",
        "",
        "| device | status | steady samples/s | overall samples/s | vs cpu |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['device']} | {r['status']}: {r['why']} | - | - | - |")
            continue
        steady, ratio = r["steady_samples_per_s"], r["vs_cpu"]
        lines.append(
            f"| {r['device']} | ok | {'-' if steady is None else f'{steady:,.0f}'} "
            f"| {r['overall_samples_per_s']:,.0f} | {'-' if ratio is None else f'{ratio:.1f}x'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Entry point of `hpcai bench hardware`; returns the exit status (2: bad input, 1: a run failed)."""
    status, report = report_main(PROG, argv, parse_args, run_bench, format_markdown)
    if report is None:
        return status
    return 1 if any(r["status"] == "failed" for r in report["rows"]) else 0
