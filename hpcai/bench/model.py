"""`hpcai bench model`: an alpha-beta-gamma cost model of this MPI, fitted here, checked, and extrapolated.

    hpcai bench model --json model.json --plot model.png
    hpcai bench model --max-ranks 3 --sizes 1MiB,16MiB --iters 5
    hpcai bench allreduce -n 4 --json ar4.json && hpcai bench model --measured ar4.json --json model.json

Measured on this machine (each step relaunches this module under `mpiexec -n P`, OMP_NUM_THREADS=1):
- alpha (latency, s) and beta (s per byte): a ping-pong between 2 ranks (Send/Recv of float32 buffers, 8 B to
  16 MiB, median round trip / 2). alpha = the 8-byte one-way time; beta = least-squares slope of
  (t - alpha) against bytes over the messages of 64 KiB and more.
- gamma (s per byte reduced): np.add(a, b, out=a) on 16 MiB of float32, one rank.
- all-reduce times at P = 2..--max-ranks: MPI_Allreduce and our ring (`ring_allreduce(algorithm="ring")`),
  median over iterations of the slowest rank's time.

Predicted (the textbook ring: reduce-scatter then all-gather, each 2(p-1)/p of the message over each link):
    T_ring(n, p) = 2(p-1) k alpha + 2(p-1)/p n beta + (p-1)/p n gamma
with k = 1 for the textbook ring and k = ceil(n / (p x segment)) messages per step for our segmented ring.
Pipeline parallelism (GPipe / 1F1B schedule) on p ranks = S stages x D data-parallel replicas, m
micro-batches, C seconds of compute for one replica's batch on one device, a bytes of activations per
micro-batch boundary, G bytes of gradients for the whole model:
    T_step = (m + S - 1) (C / (S m) + 2 (alpha + a beta)) + T_ring(G / S, D),   bubble = (S-1) / (m+S-1)
(no p2p term when S = 1; the gradient all-reduce is not overlapped: an upper bound). Predictions run to
64-1024 ranks; they are set against measurements wherever both exist (P = 2..4 here, and any
`hpcai bench allreduce --json` file given with --measured). With more ranks than cores (3 and 4 ranks on a
2-core machine) the measured times include waiting for a core, which the model does not know about.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hpcai.bench import report_main
from hpcai.bench.allreduce import format_size, parse_size
from hpcai.errors import UserError

PROG = "hpcai bench model"
PINGPONG_SIZES = [8] + [1 << k for k in range(10, 25, 2)]  # 8 B, 1 KiB, 4 KiB, ... 16 MiB
FIT_FROM_BYTES = 64 << 10  # beta from messages this large and up: below, latency and noise dominate
LARGE_RANKS = (64, 128, 256, 512, 1024)


# ------------------------------------------------------------------------------------------- the model


def ring_allreduce_time(
    nbytes: float, p: int, alpha: float, beta: float, gamma: float, segment: int | None = None
) -> float:
    """Predicted seconds of a ring all-reduce of ``nbytes`` on ``p`` ranks (0 for one rank).

    ``segment`` None: the textbook ring (one message per step); else our ring, which sends each step's chunk
    of nbytes / p in messages of at most ``segment`` bytes, each paying alpha.
    """
    if p <= 1:
        return 0.0
    k = 1 if segment is None else max(1, math.ceil(nbytes / p / segment))
    return 2 * (p - 1) * k * alpha + 2 * (p - 1) / p * nbytes * beta + (p - 1) / p * nbytes * gamma


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """Idle fraction of a GPipe/1F1B step: (S - 1) / (m + S - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def pipeline_step_time(
    ranks: int,
    stages: int,
    micro_batches: int,
    compute_s: float,
    activation_bytes: float,
    grad_bytes: float,
    alpha: float,
    beta: float,
    gamma: float,
) -> dict[str, float]:
    """Predicted step of ``stages`` pipeline stages x ranks/stages replicas (see the module docstring)."""
    if ranks % stages:
        raise ValueError(f"{ranks} ranks do not split into {stages} stages")
    replicas = ranks // stages
    slot = compute_s / (stages * micro_batches)
    p2p = 2 * (alpha + activation_bytes * beta) if stages > 1 else 0.0
    pipe = (micro_batches + stages - 1) * (slot + p2p)
    allreduce = ring_allreduce_time(grad_bytes / stages, replicas, alpha, beta, gamma)
    step = pipe + allreduce
    return {
        "ranks": ranks,
        "stages": stages,
        "replicas": replicas,
        "micro_batches": micro_batches,
        "bubble": pipeline_bubble(stages, micro_batches),
        "pipeline_s": pipe,
        "allreduce_s": allreduce,
        "step_s": step,
        "efficiency": (compute_s / stages) / step,  # the ideal: compute split evenly, nothing else
    }


def fit_alpha_beta(sizes: list[int], one_way_s: list[float]) -> tuple[float, float]:
    """alpha = the smallest message's time; beta = least-squares slope of (t - alpha) over bytes >= 64 KiB."""
    pts = sorted(zip(sizes, one_way_s, strict=True))
    alpha = pts[0][1]
    big = [(n, t - alpha) for n, t in pts if n >= FIT_FROM_BYTES] or pts[-1:]
    beta = sum(n * t for n, t in big) / sum(n * n for n, _ in big)
    return alpha, max(beta, 0.0)


# ------------------------------------------------------------------------------------- measuring (ranks)


def _measure_pingpong(iters: int) -> dict[str, Any]:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    out: dict[str, Any] = {"sizes": [], "one_way_s": []}
    for nbytes in PINGPONG_SIZES:
        buf = np.zeros(max(1, nbytes // 4), np.float32)
        reps = iters if nbytes >= 1 << 20 else iters * 10  # small messages: cheap, noisier, more of them
        times = []
        for it in range(reps + 2):
            comm.Barrier()
            t0 = time.perf_counter()
            if rank == 0:
                comm.Send([buf, MPI.FLOAT], dest=1, tag=1)
                comm.Recv([buf, MPI.FLOAT], source=1, tag=2)
            elif rank == 1:
                comm.Recv([buf, MPI.FLOAT], source=0, tag=1)
                comm.Send([buf, MPI.FLOAT], dest=0, tag=2)
            if it >= 2:  # two warm-up round trips
                times.append((time.perf_counter() - t0) / 2)
        out["sizes"].append(buf.nbytes)
        out["one_way_s"].append(float(np.median(times)))
    a = np.ones(4 << 20, np.float32)
    b = np.ones_like(a)
    adds = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.add(a, b, out=a)
        adds.append(time.perf_counter() - t0)
    out["gamma"] = float(np.median(adds)) / a.nbytes
    return out


def _measure_allreduce(sizes: list[int], iters: int) -> list[dict[str, Any]]:
    import numpy as np
    from mpi4py import MPI

    from hpcai.comm import ring_allreduce

    comm = MPI.COMM_WORLD
    p = comm.Get_size()
    records = []
    for nbytes in sizes:
        arr = np.ones(nbytes // 4, np.float32)
        impls = {
            "mpi": lambda a=arr: comm.Allreduce(MPI.IN_PLACE, [a, MPI.FLOAT], MPI.SUM),
            "ring": lambda a=arr: ring_allreduce(a, comm, algorithm="ring"),
        }
        times = np.zeros((len(impls), iters))
        for it in range(iters + 2):
            for j, fn in enumerate(impls.values()):  # take turns: load from elsewhere hits both alike
                arr.fill(1.0)
                comm.Barrier()
                t0 = time.perf_counter()
                fn()
                if it >= 2:
                    times[j, it - 2] = time.perf_counter() - t0
        comm.Allreduce(MPI.IN_PLACE, times, MPI.MAX)  # each iteration takes the slowest rank's time
        for j, impl in enumerate(impls):
            records.append(
                {
                    "impl": impl,
                    "world_size": p,
                    "bytes": int(arr.nbytes),
                    "seconds": float(np.median(times[j])),
                }
            )
    return records


def _rank_main(argv: list[str]) -> int:
    """Inside mpiexec: ``--_measure pingpong|allreduce --_out FILE [--sizes ..] [--iters K]``."""
    from mpi4py import MPI

    ap = argparse.ArgumentParser()
    ap.add_argument("--_measure", dest="measure", required=True)
    ap.add_argument("--_out", dest="out", required=True)
    ap.add_argument("--sizes", default="")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args(argv)
    if a.measure == "pingpong":
        result: Any = _measure_pingpong(a.iters)
    else:
        result = _measure_allreduce([parse_size(s) for s in a.sizes.split(",")], a.iters)
    if MPI.COMM_WORLD.Get_rank() == 0:
        Path(a.out).write_text(json.dumps(result))
    return 0


def _launch(p: int, args: list[str]) -> Any:
    """Run this module on ``p`` ranks with ``args``; return what rank 0 wrote."""
    from hpcai.launch import find_mpiexec, module_env, mpiexec_command

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        cmd = mpiexec_command(p, ["-m", "hpcai.bench.model", *args, "--_out", str(out)], find_mpiexec())
        env = module_env(p) | {"OMP_NUM_THREADS": "1"}  # one thread per rank: scaling over ranks, not threads
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"measurement on {p} ranks failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
            )
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------- report


def compare(
    measured: list[dict[str, Any]], alpha: float, beta: float, gamma: float, segment: int
) -> list[dict]:
    """Each measured all-reduce beside the prediction of its implementation (ring: textbook and segmented)."""
    rows = []
    for m in measured:
        p, n = int(m["world_size"]), int(m["bytes"])
        if m.get("impl") not in ("ring", "mpi"):
            continue
        textbook = ring_allreduce_time(n, p, alpha, beta, gamma)
        ours = ring_allreduce_time(n, p, alpha, beta, gamma, segment)
        predicted = ours if m["impl"] == "ring" else textbook
        rows.append(
            {
                "impl": m["impl"],
                "ranks": p,
                "bytes": n,
                "measured_s": float(m["seconds"]),
                "predicted_s": predicted,
                "measured_over_predicted": float(m["seconds"]) / predicted if predicted else None,
                "source": m.get("source", "this run"),
            }
        )
    return rows


def large_scale(alpha: float, beta: float, gamma: float, args: argparse.Namespace) -> dict[str, list[dict]]:
    allreduce = [
        {"ranks": p, "bytes": n, "predicted_s": ring_allreduce_time(n, p, alpha, beta, gamma)}
        for p in LARGE_RANKS
        for n in (1 << 20, 25 << 20, 100 << 20)
    ]
    pipeline = [
        pipeline_step_time(
            p,
            s,
            args.micro_batches,
            args.compute_s,
            args.activation_bytes,
            args.grad_bytes,
            alpha,
            beta,
            gamma,
        )
        for p in LARGE_RANKS
        for s in (1, 4, 8, 16)
    ]
    return {"allreduce": allreduce, "pipeline": pipeline}


def format_report(r: dict[str, Any]) -> str:
    c = r["constants"]
    lines = [
        f"alpha {c['alpha_s'] * 1e6:.2f} us, beta {c['beta_s_per_byte'] * 1e9:.4f} ns/B "
        f"({1e-9 / c['beta_s_per_byte'] if c['beta_s_per_byte'] else float('inf'):.2f} GB/s), "
        f"gamma {c['gamma_s_per_byte'] * 1e9:.4f} ns/B (load average {r['load_average'][0]:.1f}, "
        f"{r['cpus']} CPUs)",
        "",
        "| impl | ranks | size | measured (ms) | predicted (ms) | measured / predicted | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["compare"]:
        ratio = x["measured_over_predicted"]
        lines.append(
            f"| {x['impl']} | {x['ranks']} | {format_size(x['bytes'])} | {x['measured_s'] * 1e3:.3f} "
            f"| {x['predicted_s'] * 1e3:.3f} | {'-' if ratio is None else f'{ratio:.2f}'} | {x['source']} |"
        )
    lines += [
        "",
        "Predicted ring all-reduce (ms):",
        "",
        "| ranks | 1MiB | 25MiB | 100MiB |",
        "|---|---|---|---|",
    ]
    for p in LARGE_RANKS:
        cells = [x["predicted_s"] * 1e3 for x in r["large"]["allreduce"] if x["ranks"] == p]
        lines.append(f"| {p} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    pp = r["pipeline_inputs"]
    lines += [
        "",
        f"Predicted pipeline step (compute {pp['compute_s']} s per replica batch, {pp['micro_batches']} "
        f"micro-batches, {format_size(int(pp['activation_bytes']))} activations, "
        f"{format_size(int(pp['grad_bytes']))} gradients); not measurable on this branch:",
        "",
        "| ranks | stages | replicas | bubble | pipeline (s) | all-reduce (s) | step (s) | efficiency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in r["large"]["pipeline"]:
        lines.append(
            f"| {x['ranks']} | {x['stages']} | {x['replicas']} | {x['bubble']:.3f} | {x['pipeline_s']:.4f} "
            f"| {x['allreduce_s']:.4f} | {x['step_s']:.4f} | {x['efficiency']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = r["constants"]
    a, b, g = c["alpha_s"], c["beta_s_per_byte"], c["gamma_s_per_byte"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ranks = sorted({x["ranks"] for x in r["compare"]})
    sizes = [1 << k for k in range(12, 27)]
    for i, p in enumerate(ranks):
        color = f"C{i}"
        ax1.plot(
            sizes,
            [ring_allreduce_time(n, p, a, b, g, r["segment_bytes"]) for n in sizes],
            color=color,
            label=f"predicted, {p} ranks",
        )
        for impl, marker in (("ring", "o"), ("mpi", "x")):
            pts = [
                (x["bytes"], x["measured_s"]) for x in r["compare"] if x["ranks"] == p and x["impl"] == impl
            ]
            if pts:
                ax1.scatter(
                    *zip(*pts, strict=True), color=color, marker=marker, label=f"{impl} measured, {p}"
                )
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="bytes",
        ylabel="seconds",
        title="all-reduce: predicted vs measured",
    )
    ax1.legend(fontsize=7)
    for n in (1 << 20, 25 << 20, 100 << 20):
        ax2.plot(
            LARGE_RANKS,
            [ring_allreduce_time(n, p, a, b, g) for p in LARGE_RANKS],
            marker="o",
            label=format_size(n),
        )
    ax2.set(xscale="log", yscale="log", xlabel="ranks", ylabel="seconds", title="predicted ring all-reduce")
    ax2.set_xticks(LARGE_RANKS, [str(p) for p in LARGE_RANKS])
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UserError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-ranks", type=int, default=4, help="measure all-reduce on 2..N ranks (default 4)")
    ap.add_argument("--sizes", default="64KiB,1MiB,4MiB,16MiB", help="all-reduce sizes to measure")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per size (default 10)")
    ap.add_argument(
        "--measured", type=Path, action="append", default=[], help="`hpcai bench allreduce --json` file"
    )
    ap.add_argument("--micro-batches", type=int, default=32, help="pipeline micro-batches m (default 32)")
    ap.add_argument(
        "--compute-s", type=float, default=1.0, help="compute of one replica's batch (default 1 s)"
    )
    ap.add_argument("--activation-bytes", type=parse_size, default=parse_size("4MiB"), help="per micro-batch")
    ap.add_argument(
        "--grad-bytes", type=parse_size, default=parse_size("100MiB"), help="the model's gradients"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the report here (and FILE.md)")
    ap.add_argument("--plot", type=Path, default=None, help="write predicted vs measured (PNG)")
    args = ap.parse_args(argv)
    if args.max_ranks < 2 or args.iters < 1 or args.micro_batches < 1:
        raise UserError("need --max-ranks >= 2, --iters >= 1 and --micro-batches >= 1")
    for f in args.measured:
        if not f.is_file():
            raise UserError(f"--measured: no such file {f}")
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from hpcai.comm.ring import SEGMENT_BYTES

    pp = _launch(2, ["--_measure", "pingpong", "--iters", str(args.iters)])
    alpha, beta = fit_alpha_beta(pp["sizes"], pp["one_way_s"])
    gamma = pp["gamma"]
    measured: list[dict[str, Any]] = []
    for p in range(2, args.max_ranks + 1):
        measured += _launch(p, ["--_measure", "allreduce", "--sizes", args.sizes, "--iters", str(args.iters)])
    for f in args.measured:
        try:
            records = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--measured {f}: not JSON: {e}") from None
        measured += [
            dict(rec, source=f.name)
            for rec in records
            if {"impl", "world_size", "bytes", "seconds"} <= rec.keys()
        ]
    return {
        "constants": {"alpha_s": alpha, "beta_s_per_byte": beta, "gamma_s_per_byte": gamma},
        "pingpong": pp,
        "segment_bytes": SEGMENT_BYTES,
        "compare": compare(measured, alpha, beta, gamma, SEGMENT_BYTES),
        "pipeline_inputs": {
            "compute_s": args.compute_s,
            "micro_batches": args.micro_batches,
            "activation_bytes": args.activation_bytes,
            "grad_bytes": args.grad_bytes,
        },
        "large": large_scale(alpha, beta, gamma, args),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str]) -> int:
    """Entry point of `hpcai bench model`; returns the exit status."""
    if argv and argv[0] == "--_measure":
        return _rank_main(argv)
    return report_main(PROG, argv, parse_args, run, format_report, write_plot)[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
