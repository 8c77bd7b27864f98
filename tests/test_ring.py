"""Tests of hpcai.comm.ring_allreduce and `hpcai bench allreduce`.

    OMP_NUM_THREADS=1 PATH=/work/main/.venv/bin:$PATH python -m pytest tests/test_ring.py

Multi-rank correctness runs tests/mpi_scripts/ring_check.py under a real `mpiexec -n K` (K = 1..5,
oversubscribed on small machines); argument checking and the ring's schedule are tested in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcai.bench import allreduce as bench
from hpcai.comm import ring_allreduce
from hpcai.comm.ring import _schedule, ring_allreduce_start
from hpcai.launch import cma_allowed

REPO = Path(__file__).resolve().parents[1]
RING_CHECK = REPO / "tests" / "mpi_scripts" / "ring_check.py"
SELF = MPI.COMM_SELF


@pytest.fixture(scope="session")
def mpiexec() -> str:
    """The mpiexec beside this Python (the venv's MPICH), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    assert found, "no mpiexec next to the interpreter or on PATH"
    return found


def child_env() -> dict[str, str]:
    """Environment for subprocesses: one thread per rank, this checkout importable, no inherited MPI world."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


# ----------------------------------------------------------------------------------------------------------
# Multi-rank: real mpiexec


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5])
def test_ring_matches_mpi_allreduce_and_is_bit_identical(mpiexec: str, ranks: int) -> None:
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(RING_CHECK)]
    proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"ring_check: OK on {ranks} ranks" in proc.stdout


@pytest.mark.skipif(not cma_allowed(), reason="process_vm_readv between ranks not allowed here")
def test_ring_is_right_over_single_copy_transfers(mpiexec: str) -> None:
    """What `hpcai run` turns on where the kernel allows (MPICH's CMA path for large messages)."""
    cmd = [mpiexec, "-n", "3", sys.executable, "-m", "mpi4py", str(RING_CHECK)]
    env = child_env() | {"MPIR_CVAR_CH4_CMA_ENABLE": "1"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "ring_check: OK on 3 ranks" in proc.stdout


def test_stall_watch_reads_every_rank_without_waiting_for_a_busy_one(mpiexec: str) -> None:
    """Numbers read through shared memory and through RMA agree; a rank busy outside MPI blocks no read."""
    script = REPO / "tests" / "mpi_scripts" / "stall_check.py"
    cmd = [mpiexec, "-n", "3", sys.executable, "-m", "mpi4py", str(script)]
    proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "stall_check: OK on 3 ranks" in proc.stdout


def test_bench_runs_end_to_end_and_writes_json(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "ar.json", tmp_path / "ar.png"
    cmd = [sys.executable, "-m", "hpcai.bench.allreduce", "-n", "2", "--sizes", "4KiB,1MiB"]
    cmd += ["--iters", "2", "--warmup", "1", "--json", str(out_json), "--plot", str(out_png)]
    proc = subprocess.run(cmd, env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "ring/mpi" in proc.stdout and "ring/gloo" in proc.stdout
    records = json.loads(out_json.read_text())
    assert len(records) == 6
    assert {(r["impl"], r["bytes"]) for r in records} == {
        (impl, size) for impl in ("ring", "mpi", "gloo") for size in (4096, 1 << 20)
    }
    for r in records:
        assert r["world_size"] == 2 and r["dtype"] == "float32"
        assert r["seconds"] > 0 and r["algbw_GBps"] > 0
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"])  # 2(n-1)/n = 1 at n = 2
    ring_paths = {r["bytes"]: r["algorithm"] for r in records if r["impl"] == "ring"}
    assert ring_paths == {4096: "mpi", 1 << 20: "ring"}  # small messages go to MPI_Allreduce
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------
# One process: argument checking


@pytest.mark.parametrize(
    ("make_buf", "op", "error", "match"),
    [
        (lambda: np.zeros(10, np.float32)[::2], "sum", ValueError, "not contiguous"),
        (lambda: torch.zeros(4, 4).t(), "sum", ValueError, "not contiguous"),
        (lambda: np.zeros(4, np.float32), "prod", ValueError, "unknown reduction op 'prod'"),
        (lambda: np.zeros(4, np.uint8), "sum", TypeError, "unsupported array dtype"),
        (lambda: np.zeros(4, np.complex64), "sum", TypeError, "unsupported array dtype"),
        (lambda: np.zeros(4, ">f4"), "sum", TypeError, "native byte order"),
        (lambda: torch.zeros(4, dtype=torch.bool), "sum", TypeError, "unsupported tensor dtype"),
        (lambda: [1.0, 2.0], "sum", TypeError, "expected a numpy array or a CPU torch tensor"),
    ],
)
def test_bad_arguments_raise_clear_errors(make_buf, op: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ring_allreduce(make_buf(), SELF, op)


def test_read_only_array_and_bad_algorithm_are_rejected() -> None:
    ro = np.zeros(4, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        ring_allreduce(ro, SELF)
    with pytest.raises(ValueError, match="unknown algorithm 'tree'"):
        ring_allreduce(np.zeros(4, np.float32), SELF, algorithm="tree")


def test_one_rank_returns_the_same_buffer_unchanged() -> None:
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    t = torch.arange(5, dtype=torch.bfloat16)
    assert ring_allreduce(a, SELF, "max") is a and np.array_equal(a, np.arange(6).reshape(2, 3))
    assert ring_allreduce_start(t, SELF).wait() is t and torch.equal(t, torch.arange(5, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------
# The ring's schedule (pure): every element is reduced once and delivered everywhere, senders match receivers


@pytest.mark.parametrize("p", [2, 3, 4, 5])
@pytest.mark.parametrize(("n", "seg"), [(1, 4), (3, 1), (10, 3), (1001, 64), (4096, 4096)])
def test_schedule_covers_every_element_and_pairs_sends_with_receives(p: int, n: int, seg: int) -> None:
    for r in range(p):
        own, incoming = _schedule(p, r, n, seg)
        reduced = np.zeros(n, int)
        gathered = np.zeros(n, int)
        for j, off, cnt, _ in incoming:
            assert 1 <= cnt <= seg
            (reduced if j < p - 1 else gathered)[off : off + cnt] += 1
        lo, hi = r * n // p, (r + 1) * n // p  # rank r's own chunk: sent first, never reduced into here
        nxt = (r + 1) % p  # the chunk rank r ends up owning: reduced last, never received in the all-gather
        assert np.all(reduced[lo:hi] == 0) and np.all(np.delete(reduced, np.arange(lo, hi)) == 1)
        nlo, nhi = nxt * n // p, (nxt + 1) * n // p
        assert np.all(gathered[nlo:nhi] == 0) and np.all(np.delete(gathered, np.arange(nlo, nhi)) == 1)
        # The right neighbour receives, in order, exactly what rank r sends: its own chunk, then what it
        # received.
        sent = [(o, k) for o, k in own] + [(o, k) for j, o, k, _ in incoming if j < 2 * (p - 1) - 1]
        received_right = [(o, k) for _, o, k, _ in _schedule(p, (r + 1) % p, n, seg)[1]]
        assert sent == received_right


# ----------------------------------------------------------------------------------------------------------
# Bench command line


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--sizes", "4KiB,12XB"], "cannot parse size '12XB'"),
        (["--sizes", "0"], "must be positive"),
        (["-n", "0"], "-n must be at least 1"),
        (["--dtype", "float8"], "unknown dtype 'float8'"),
        (["--iters", "0"], "--iters >= 1"),
        (["--frobnicate"], "unrecognized arguments"),
        (["-n", "two"], "invalid int value"),
    ],
)
def test_bench_bad_arguments_exit_2_with_one_line(argv: list[str], match: str, capsys) -> None:
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hpcai bench allreduce: error:") and match in err
    assert "Traceback" not in err


def test_parse_size_units() -> None:
    assert [bench.parse_size(s) for s in ("4096", "4KiB", "64MiB", "1GiB", "2k", "3M")] == [
        4096,
        4096,
        64 << 20,
        1 << 30,
        2048,
        3 << 20,
    ]
    assert bench.format_size(64 << 20) == "64MiB" and bench.format_size(1000) == "1000B"


def test_automatic_choice_by_size_and_ranks() -> None:
    from hpcai.comm.ring import choose_algorithm

    kib, mib = 1 << 10, 1 << 20
    assert [choose_algorithm(n, 2) for n in (4 * kib, 512 * kib, 1 * mib, 64 * mib)] == [
        "mpi",
        "mpi",
        "ring",
        "ring",
    ]
    assert [choose_algorithm(n, 3) for n in (64 * kib, 1 * mib)] == ["mpi", "ring"]
    # From 4 ranks: mid-size messages by recursive halving on power-of-two counts, MPI_Allreduce on others
    assert [choose_algorithm(n, 4) for n in (64 * kib, 1 * mib, 4 * mib, 4 * mib + 4)] == [
        "mpi",
        "halving",
        "halving",
        "ring",
    ]
    assert [choose_algorithm(n, 16) for n in (2 * mib, 16 * mib)] == ["halving", "ring"]
    assert [choose_algorithm(n, 6) for n in (2 * mib, 16 * mib)] == ["mpi", "ring"]


def test_bench_ddp_runs_end_to_end_and_writes_json(tmp_path: Path) -> None:
    """`hpcai bench ddp` on 2 ranks, a tiny model: every phase runs; the JSON has the issue's keys."""
    out_json = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "hpcai.bench.ddp", "-n", "2", "--hidden", "64,64", "--batch", "8"]
    cmd += ["--steps", "4", "--warmup", "1", "--rounds", "2", "--json", str(out_json)]
    proc = subprocess.run(cmd, env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "ours / DDP" in proc.stdout
    r = json.loads(out_json.read_text())
    assert r["world_size"] == 2 and r["batch_per_rank"] == 8
    for key in ("ours_samples_per_s", "ddp_samples_per_s", "single_samples_per_s"):
        assert r[key] > 0
    assert r["ours_vs_ddp"] == pytest.approx(r["ours_samples_per_s"] / r["ddp_samples_per_s"])
    for mode in ("", "_no_overlap"):
        mean, slowest = r[f"exposed_comm_fraction{mode}"], r[f"exposed_comm_fraction{mode}_slowest"]
        assert 0 < slowest <= mean < 1  # the rank that finished backward last waits least
