"""``hpcai bench ps``: bsp vs ssp vs async parameter-server training with one worker slowed down.

    hpcai bench ps [--steps 120] [--compute-s 0.02] [--slow-factor 4] [--target-loss 0.5] [--json FILE]
    hpcai bench ps --no-accuracy          # skip the no-straggler accuracy runs (ps async vs data parallel)
    hpcai bench ps --seeds 10 --set ps.update_rule=plain   # any job override, applied to every run

Three runs of jobs/digits_ps.toml (1 server + 4 workers, the same steps, seed and data) that differ only in
ps.mode, with the last worker slowed ``--slow-factor`` times (``--slow-rank 4:FACTOR``). Each worker step
sleeps ``--compute-s`` besides its real compute: on a small machine where 5 ranks share 2 cores the digits
MLP's step is ~1 ms and CPU contention would dominate, so the sleep stands in for a bigger model and the runs
measure the protocol (who waits for whom), not the CPU. From each run's summary.json and metrics.jsonl:
update throughput (worker gradients applied per second of training), training time until the logged
training loss first reaches ``--target-loss``, and the staleness (steps ahead of the slowest worker) and
delay (updates applied between a worker's read and its update) of the applied updates, max / mean. Then,
unless ``--no-accuracy``, the full 20-epoch job without straggler or sleep in async mode and as synchronous
data parallel on 4 ranks (same global batch), for the final test accuracy of both, for seeds 0 to
``--seeds`` - 1; the gap is of the means.

``--json`` writes bsp_updates_per_s, ssp_updates_per_s, async_updates_per_s, async_vs_bsp_throughput,
<mode>_time_to_target_s, async_vs_bsp_time_to_target, <mode>_staleness_histogram, <mode>_test_accuracy,
and (with accuracy runs) ps_async_test_accuracy, data_parallel_test_accuracy, accuracy_gap_points.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from hpcai import resources
from hpcai.errors import UserError

MODES = ("bsp", "ssp", "async")


def _run(run_dir: Path, data: Path, job: str, sets: list[str], extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "hpcai", "run", job, "--run-dir", str(run_dir)]
    cmd += ["--set", f"data.path={json.dumps(str(data))}", "--set", "checkpoint.final=false"]
    cmd += ["--set", "checkpoint.every_steps=0", "--set", "checkpoint.every_seconds=0"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd + extra, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd + extra)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["history"] = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return summary


def time_to_target(history: list[dict], target: float) -> float | None:
    """Training seconds until the logged loss first reaches ``target`` (None: never)."""
    for r in history:
        if r["loss"] <= target:
            return r.get("train_s", r["wall_s"])
    return None


def _max_mean(hist: dict[str, int]) -> str:
    n = sum(hist.values())
    return f"{max(map(int, hist))} / {sum(int(k) * v for k, v in hist.items()) / max(n, 1):.1f}"


def _accuracy(tmp: Path, data: Path, args: argparse.Namespace, out: dict) -> None:
    """No straggler, the full 20-epoch job: ps async against data parallel on 4 ranks, seed by seed
    (asynchrony makes every ps run differ, so one seed says little)."""
    ps_acc, dp_acc = [], []
    for seed in range(args.seeds):
        sets = [f"train.seed={seed}", *args.set]
        ps_job = str(resources.example_job("digits_ps"))
        ps = _run(tmp / f"acc-ps-{seed}", data, ps_job, ["ps.mode=async", *sets], [])
        dp = _run(tmp / f"acc-dp-{seed}", data, str(resources.example_job("digits")), sets, ["-n", "4"])
        ps_acc.append(ps["test_accuracy"])
        dp_acc.append(dp["test_accuracy"])
        print(
            f"no straggler, seed {seed}: ps async test accuracy {ps_acc[-1]:.4f}, "
            f"data parallel {dp_acc[-1]:.4f}"
        )
    out["ps_async_test_accuracy"] = sum(ps_acc) / len(ps_acc)
    out["data_parallel_test_accuracy"] = sum(dp_acc) / len(dp_acc)
    out["ps_async_test_accuracies"], out["data_parallel_test_accuracies"] = ps_acc, dp_acc
    out["accuracy_gap_points"] = 100 * (out["data_parallel_test_accuracy"] - out["ps_async_test_accuracy"])
    print(
        f"no straggler, 20 epochs, mean of {args.seeds} seeds: ps async "
        f"{out['ps_async_test_accuracy']:.4f}, data parallel (4 ranks) "
        f"{out['data_parallel_test_accuracy']:.4f}: gap {out['accuracy_gap_points']:.2f} points"
    )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hpcai bench ps", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120, help="global steps per run (x4 worker updates)")
    p.add_argument("--compute-s", type=float, default=0.02, help="simulated compute per worker step")
    p.add_argument("--slow-factor", type=float, default=4.0, help="the slowed worker's step-time factor")
    p.add_argument("--staleness", type=int, default=2, help="ssp bound")
    p.add_argument("--target-loss", type=float, default=0.5)
    p.add_argument("--no-accuracy", action="store_true", help="skip the no-straggler accuracy runs")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the no-straggler accuracy comparison")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job overrides, every run")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.compute_s < 0 or args.slow_factor < 1 or args.seeds < 1:
        raise UserError("hpcai bench ps: --steps >= 1, --compute-s >= 0, --slow-factor >= 1, --seeds >= 1")
    out: dict = {"steps": args.steps, "compute_s": args.compute_s, "slow_factor": args.slow_factor}
    out["target_loss"] = args.target_loss
    with tempfile.TemporaryDirectory(prefix="hpcai-bench-ps-") as tmp:
        tmp = Path(tmp)
        data = tmp / "digits"
        from hpcai.data.etl import build_dataset

        build_dataset("digits", data, shards=4, log=lambda *_: None)
        sets = [
            f"train.steps={args.steps}",
            "train.log_every=2",
            f"ps.simulate_compute_s={args.compute_s}",
            f"ps.staleness={args.staleness}",
            *args.set,
        ]
        print(
            f"{'mode':<6} {'updates/s':>10} {'time to loss<=' + str(args.target_loss):>18} {'train_s':>8} "
            f"{'test acc':>8}  {'staleness max/mean':>18}  {'delay max/mean':>14}"
        )
        for mode in MODES:
            s = _run(tmp / mode, data, str(resources.example_job("digits_ps")), sets + [f"ps.mode={mode}"],
                     ["--slow-rank", f"4:{args.slow_factor}"])  # fmt: skip
            ttt = time_to_target(s["history"], args.target_loss)
            out[f"{mode}_updates_per_s"] = s["updates_per_s"]
            out[f"{mode}_time_to_target_s"] = ttt
            out[f"{mode}_train_s"] = s["train_s"]
            out[f"{mode}_test_accuracy"] = s["test_accuracy"]
            out[f"{mode}_final_loss"] = s["final_loss"]
            out[f"{mode}_updates_per_worker"] = s["updates_per_worker"]
            out[f"{mode}_staleness_histogram"] = s["staleness_histogram"]
            out[f"{mode}_delay_histogram"] = s["delay_histogram"]
            shown = f"{ttt:.2f} s" if ttt is not None else "not reached"
            print(
                f"{mode:<6} {s['updates_per_s']:>10.1f} {shown:>18} {s['train_s']:>8.2f} "
                f"{s['test_accuracy']:>8.4f}  {_max_mean(s['staleness_histogram']):>18}  "
                f"{_max_mean(s['delay_histogram']):>14}",
                flush=True,
            )
        out["async_vs_bsp_throughput"] = out["async_updates_per_s"] / out["bsp_updates_per_s"]
        a, b = out["async_time_to_target_s"], out["bsp_time_to_target_s"]
        out["async_vs_bsp_time_to_target"] = a / b if a is not None and b else None
        ratio = out["async_vs_bsp_time_to_target"]
        print(
            f"async vs bsp: {out['async_vs_bsp_throughput']:.2f}x the update throughput, "
            f"{ratio if ratio is not None else float('nan'):.2f}x the time to the target loss"
        )
        if not args.no_accuracy:
            _accuracy(tmp, data, args, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
