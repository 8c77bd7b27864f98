"""``hpcai bench checkpoint``: blocking time of synchronous vs asynchronous checkpoints in the training loop.

    hpcai bench checkpoint [--hidden 5000,5000,5000] [--steps 100] [--every 10] [--rounds 3] [-n 1]
                           [--blocks 16] [--block-steps 20] [--json FILE]

Three runs of the digits job with a >= 50M-parameter MLP, the same steps each: no checkpoints, a synchronous
checkpoint every ``--every`` steps, an asynchronous one (snapshot into reused host buffers, written by a
thread); ``--rounds`` rounds of the three, back to back. A mode's overhead is the median over rounds of its
training time over the same round's no-checkpoint run; blocking times are the median over every round. The
run directories (GBs of checkpoints) are deleted afterwards unless ``--dir`` names where they go.
From each run's summary.json: training time (``train_s``, the final checkpoint excluded) and the time each
checkpoint blocked the loop. In the same run, the disk's raw sequential write speed with fsync, through the
page cache and with O_DIRECT, the faster counting (the peer the checkpoint write is measured against).
Then the async overhead once more, in one process, blocks with and without checkpoints interleaved
(``interleaved_overhead``): the runs above differ by 10-15% from minute to minute here, more than the
overhead to be measured. Prints a table; ``--json`` writes the keys sync_block_s, async_block_s,
write_GBps, raw_write_GBps, overhead_sync, overhead_async (fractions of the no-checkpoint training time),
overhead_async_interleaved.
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

import numpy as np

from hpcai import resources
from hpcai.errors import UserError


def raw_write_gbps(directory: Path, nbytes: int, direct: bool = False, block: int = 64 << 20) -> float:
    """Sequential write of ``nbytes`` with one fsync at the end, like a checkpoint commit: through the page
    cache (``dd conv=fsync``) or with O_DIRECT from aligned memory (``dd oflag=direct conv=fsync``)."""
    from hpcai.checkpoint import ALIGN, aligned_empty

    block = min(block, -(-nbytes // ALIGN) * ALIGN)
    buf = aligned_empty((block,), np.uint8)
    buf[:] = np.frombuffer(os.urandom(block), np.uint8)
    path = directory / ".raw-write-probe"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (getattr(os, "O_DIRECT", 0) if direct else 0)
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o600)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, memoryview(buf)[: min(block, -(-left // ALIGN) * ALIGN)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / seconds / 1e9


def raw_write_best(directory: Path, nbytes: int, passes: int = 2) -> dict[str, float]:
    """The disk's best sequential write speed, buffered and direct, ``passes`` tries each."""
    out = {"buffered": 0.0, "direct": 0.0}
    for _ in range(passes):
        out["buffered"] = max(out["buffered"], raw_write_gbps(directory, nbytes))
        try:
            out["direct"] = max(out["direct"], raw_write_gbps(directory, nbytes, direct=True))
        except OSError:  # no O_DIRECT on this file system
            pass
    return out


def _run(run_dir: Path, data: Path, hidden: str, steps: int, ranks: int, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "hpcai",
        "run",
        str(resources.example_job("digits")),
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


def interleaved_overhead(
    directory: Path, widths: list[int], every: int, blocks: int, block_steps: int, threads: int
) -> dict:
    """Async checkpoint overhead measured in one process, free of the minute-to-minute drift between runs.

    The digits job's model, optimizer and batch size, on synthetic data, trained in blocks of
    ``block_steps`` steps; blocks with an asynchronous checkpoint every ``every`` steps (the writer and the
    fence exactly as ``hpcai run`` uses them) alternate with blocks without, in the order ABBA BAAB... so
    a linear drift cancels. A checkpoint block ends by waiting for its last write, which therefore counts
    in full. Overhead: summed time of checkpoint blocks over summed time of the others, minus 1.
    """
    import torch
    from torch import nn

    from hpcai import checkpoint as ckpt
    from hpcai.models import mlp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = mlp((64,), 10, widths)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    loss_fn = nn.CrossEntropyLoss()
    writer = ckpt.CheckpointWriter(directory, keep=2, async_save=True, log=lambda *_: None)
    step = 0

    def train(n: int, checkpoints: bool) -> None:
        nonlocal step
        for i in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            writer.fence()
            opt.step()
            sched.step()
            step += 1
            if checkpoints and i % every == 0:  # the block's last write has `every` steps to finish
                payload = ckpt.pack_state(model, opt, sched)
                payload.attrs.update(step=step, epoch=0, step_in_epoch=step, world_size=1, spec="{}")
                writer.save(payload, deferred=ckpt.step_owned_keys(model, payload.arrays))
        writer.wait()

    train(3, False)  # warm up; optimizer state exists now
    writer.reserve(ckpt.pack_state(model, opt, sched).arrays)
    train(every, True)  # the first checkpoint allocates nothing more
    pattern = [False, True, True, False]  # ABBA: linear drift hits both alike
    times: dict[bool, list[float]] = {False: [], True: []}
    for b in range(blocks):
        on = pattern[b % 4] if (b // 4) % 2 == 0 else not pattern[b % 4]
        t0 = time.perf_counter()
        train(block_steps, on)
        times[on].append(time.perf_counter() - t0)
    ratios = [a / n - 1 for a, n in zip(times[True], times[False], strict=False)]
    return {
        "overhead_async_interleaved": sum(times[True]) / sum(times[False]) - 1,
        "interleaved_block_steps": block_steps,
        "interleaved_blocks_s": {"none": times[False], "async": times[True]},
        "interleaved_pair_overheads": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hpcai bench checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", default="5000,5000,5000", help="MLP widths (default: 50.4M parameters)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("-n", "--ranks", type=int, default=1)
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds of none/sync/async; overhead: median of paired ratios"
    )
    p.add_argument("--blocks", type=int, default=16, help="interleaved blocks (half with checkpoints)")
    p.add_argument("--block-steps", type=int, default=20)
    p.add_argument("--dir", default=None, help="where run directories go (default: a temp dir under runs/)")
    p.add_argument("--json", dest="json_file")
    try:
        args = p.parse_args(argv)
        widths = [int(w) for w in args.hidden.split(",")]
        if min(widths) < 1 or min(args.steps, args.every, args.ranks, args.rounds, args.block_steps) < 1:
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
    # Rounds of none / sync / async back to back, the order rotated each round. This machine's step time
    # drifts by 10-15% between minutes (measured: "none" 31.1 s, then 35.7 and 36.0 s), more than the
    # overhead to be measured, so each mode is compared with the "none" run of its own round and the
    # median of those paired ratios is the overhead.
    modes = list(extra)
    rounds: dict[str, list[dict]] = {k: [] for k in extra}
    for r in range(args.rounds):
        for k in modes[r % len(modes) :] + modes[: r % len(modes)]:
            rounds[k].append(_run(work / f"{k}-{r}", data, args.hidden, args.steps, args.ranks, extra[k]))
    params = rounds["none"][0]["model_parameters"]
    ckpt_files = sorted((work / "sync-0" / "checkpoints").glob("step-*.h5"))
    nbytes = ckpt_files[-1].stat().st_size
    # Blocking times of the checkpoints taken during training (the final one is outside train_s), every round.
    blocks = {
        k: [c["block_s"] for run in rounds[k] for c in run["checkpoints"] if c["step"] < args.steps]
        for k in ("sync", "async")
    }
    writer_cpu = [
        c["writer_cpu_s"] for run in rounds["async"] for c in run["checkpoints"] if "writer_cpu_s" in c
    ]
    sync_block = statistics.median(blocks["sync"])
    async_block = statistics.median(blocks["async"])
    raws = raw_write_best(work, nbytes)
    if args.blocks > 0:
        threads = max(1, (os.cpu_count() or 1) // args.ranks)  # what hpcai run gives one rank
        inter = interleaved_overhead(
            work / "interleaved", widths, args.every, args.blocks, args.block_steps, threads
        )
    raw = max(raws.values())
    train_s = {k: [run["train_s"] for run in v] for k, v in rounds.items()}
    paired = {
        k: [t / t0 - 1 for t, t0 in zip(train_s[k], train_s["none"], strict=True)] for k in ("sync", "async")
    }
    t_none = statistics.median(train_s["none"])
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
        "raw_write_GBps": raw,  # the faster of buffered + fsync and O_DIRECT + fsync, best of 2 each
        "raw_write_buffered_GBps": raws["buffered"],
        "raw_write_direct_GBps": raws["direct"],
        "train_s_none": t_none,
        "train_s_sync": statistics.median(train_s["sync"]),
        "train_s_async": statistics.median(train_s["async"]),
        "overhead_sync": statistics.median(paired["sync"]),
        "overhead_async": statistics.median(paired["async"]),
        "overhead_rounds": paired,
        # CPU the async writer thread took per checkpoint (copy, checksums, writes): a floor under its
        # overhead where training keeps every core busy, measured without the wall clock's noise
        "async_writer_cpu_s": statistics.median(writer_cpu) if writer_cpu else None,
        "sync_blocks_s": blocks["sync"],
        "async_blocks_s": blocks["async"],
        "train_s_rounds": train_s,
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
    if writer_cpu:
        interval = result["train_s_async"] / (args.steps / args.every)
        print(
            f"async writer thread: {statistics.median(writer_cpu):.3f} CPU s per checkpoint "
            f"({statistics.median(writer_cpu) / interval:.1%} of one core over a {interval:.2f} s interval)"
        )
    print(
        f"async/sync blocking {result['async_vs_sync_block']:.1%}; "
        f"checkpoint write {result['write_GBps']:.2f} GB/s vs "
        f"the disk's raw sequential write {raw:.2f} GB/s (fsync'd; buffered {raws['buffered']:.2f}, "
        f"O_DIRECT {raws['direct']:.2f})"
    )
    print(
        "train s of every round: "
        + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}" for k, v in train_s.items())
    )
    print(
        "overhead of every round (vs its own none): "
        + "; ".join(f"{k} {', '.join(f'{o:.1%}' for o in v)}" for k, v in paired.items())
    )
    if args.blocks > 0:
        result.update(inter)
        print(
            f"async overhead in one process, {args.blocks} interleaved blocks of {args.block_steps} steps: "
            f"{inter['overhead_async_interleaved']:.1%} (blocks: none "
            f"{', '.join(f'{t:.2f}' for t in inter['interleaved_blocks_s']['none'])}; async "
            f"{', '.join(f'{t:.2f}' for t in inter['interleaved_blocks_s']['async'])} s)"
        )
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(result, indent=2) + "\n")
    if not args.dir:  # the checkpoints are GBs; keep only what was asked to be kept
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
