"""``hpcai bench checkpoint``: blocking time of synchronous vs asynchronous checkpoints in the training loop.

    hpcai bench checkpoint [--hidden 5000,5000,5000] [--steps 100] [--every 10] [--rounds 2] [-n 1]
                           [--json FILE]

Three runs of the digits job with a >= 50M-parameter MLP, the same steps each: no checkpoints, a synchronous
checkpoint every ``--every`` steps, an asynchronous one (snapshot into reused host buffers, written by a
thread); ``--rounds`` times, interleaved, the fastest run of each mode counting. The run directories (GBs
of checkpoints) are deleted afterwards unless ``--dir`` names where they go.
From each run's summary.json: training time (``train_s``, the final checkpoint excluded) and the time each
checkpoint blocked the loop. In the same run, the disk's raw sequential write speed with fsync (the peer the
h5py write is measured against). Prints a table; ``--json`` writes the keys sync_block_s, async_block_s,
write_GBps, raw_write_GBps, overhead_sync, overhead_async (fractions of the no-checkpoint training time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcai.errors import UserError


def raw_write_gbps(directory: Path, nbytes: int, block: int = 64 << 20) -> float:
    """Sequential write of ``nbytes`` with one fsync at the end, like a checkpoint commit (dd conv=fsync)."""
    buf = os.urandom(min(block, nbytes))
    path = directory / ".raw-write-probe"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[: min(len(buf), left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / seconds / 1e9


def _run(run_dir: Path, data: Path, hidden: str, steps: int, ranks: int, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "hpcai",
        "run",
        "jobs/digits.toml",
        "--run-dir",
        str(run_dir),
        "-n",
        str(ranks),
    ]
    sets = [
        f"model.hidden=[{hidden}]",
        f"train.steps={steps}",
        f"data.path={json.dumps(str(data))}",
        "checkpoint.every_seconds=0",
        "checkpoint.keep=2",
        f"train.log_every={steps}",
    ]
    for s in sets + extra:
        cmd += ["--set", s]
    env = dict(os.environ, HPCAI_TTY="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark run failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpcai bench checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", default="5000,5000,5000", help="MLP widths (default: 50.4M parameters)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("-n", "--ranks", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="runs of each mode, interleaved; the fastest counts")
    p.add_argument("--dir", default=None, help="where run directories go (default: a temp dir under runs/)")
    p.add_argument("--json", dest="json_file")
    try:
        args = p.parse_args(argv)
        widths = [int(w) for w in args.hidden.split(",")]
        if min(widths) < 1 or args.steps < 1 or args.every < 1 or args.ranks < 1 or args.rounds < 1:
            raise ValueError
    except ValueError:
        raise UserError(
            "bench checkpoint: --hidden takes positive widths like 5000,5000; numbers must be >= 1"
        ) from None
    base = Path(args.dir or "runs")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=base))
    data = Path("data/digits")
    if not (data / "manifest.json").is_file():
        from hpcai.data.etl import build_dataset

        build_dataset("digits", data)
    every = [f"checkpoint.every_steps={args.every}"]
    extra = {
        "none": ["checkpoint.final=false"],
        "sync": every,
        "async": every + ["checkpoint.async_save=true"],
    }
    # Rounds of none / sync / async, interleaved, each mode's fastest run kept: this machine's step time and
    # disk drift between minutes, and every mode gets the same chance of a quiet minute.
    rounds: dict[str, list[dict]] = {k: [] for k in extra}
    for r in range(args.rounds):
        for k, sets in extra.items():
            rounds[k].append(_run(work / f"{k}-{r}", data, args.hidden, args.steps, args.ranks, sets))
    runs = {k: min(v, key=lambda s: s["train_s"]) for k, v in rounds.items()}
    params = runs["none"]["model_parameters"]
    ckpt_files = sorted((work / "sync-0" / "checkpoints").glob("step-*.h5"))
    nbytes = ckpt_files[-1].stat().st_size
    # Blocking times of the checkpoints taken during training (the final one is outside train_s).
    blocks = {
        k: [c["block_s"] for c in runs[k]["checkpoints"] if c["step"] < args.steps] for k in ("sync", "async")
    }
    sync_block = statistics.median(blocks["sync"])
    async_block = statistics.median(blocks["async"])
    raw = raw_write_gbps(work, nbytes)
    t_none = runs["none"]["train_s"]
    result = {
        "model_parameters": params,
        "checkpoint_bytes": nbytes,
        "steps": args.steps,
        "every_steps": args.every,
        "world_size": args.ranks,
        "sync_block_s": sync_block,
        "async_block_s": async_block,
        "async_vs_sync_block": async_block / sync_block,
        "write_GBps": nbytes
        / sync_block
        / 1e9,  # a sync checkpoint's block is its whole write, fsync included
        "raw_write_GBps": raw,
        "train_s_none": t_none,
        "train_s_sync": runs["sync"]["train_s"],
        "train_s_async": runs["async"]["train_s"],
        "overhead_sync": runs["sync"]["train_s"] / t_none - 1,
        "overhead_async": runs["async"]["train_s"] / t_none - 1,
        "sync_blocks_s": blocks["sync"],
        "async_blocks_s": blocks["async"],
        "train_s_rounds": {k: [r["train_s"] for r in v] for k, v in rounds.items()},
    }
    print(
        f"model {params / 1e6:.1f}M parameters, checkpoint {nbytes / 1e6:.0f} MB, {args.steps} steps, "
        f"every {args.every}, {args.ranks} rank(s)"
    )
    print(f"{'':10} {'block s':>9} {'train s':>9} {'overhead':>9}")
    print(f"{'none':10} {'':>9} {t_none:9.2f} {'':>9}")
    for k in ("sync", "async"):
        print(
            f"{k:10} {result[f'{k}_block_s']:9.3f} {result[f'train_s_{k}']:9.2f} "
            f"{result[f'overhead_{k}']:9.1%}"
        )
    print(
        f"async/sync blocking {result['async_vs_sync_block']:.1%}; "
        f"checkpoint write {result['write_GBps']:.2f} GB/s vs "
        f"raw sequential write {raw:.2f} GB/s (fsync'd)"
    )
    print("train s of every round: " + "; ".join(f"{k} {v}" for k, v in result["train_s_rounds"].items()))
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(result, indent=2) + "\n")
    if not args.dir:  # the checkpoints are GBs; keep only what was asked to be kept
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
