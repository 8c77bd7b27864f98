"""The launcher keeps a rank's last words when MPI_Abort ends the job (real mpiexec runs)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, cli_env

# Rank 0 aborts with no pause for forwarding while rank 1 sleeps (mpiexec drops the line ~1 run in 7).
ABORTING = """
import sys, time
from mpi4py import MPI
import hpcai.comm.abort as abort
abort.FORWARD_PAUSE_S = 0.0
if MPI.COMM_WORLD.Get_rank() == 0:
    time.sleep(0.3)
    abort.abort_job("hpcai: rank 0: error: MARK the first line\\nsecond line of the traceback", 7)
time.sleep(60)
"""

LAUNCH = """
import sys
from hpcai.launch import run_ranks
sys.exit(run_ranks(2, [sys.argv[1]]))
"""


def test_abort_message_arrives_exactly_once_and_every_rank_ends(tmp_path: Path) -> None:
    script = tmp_path / "aborting.py"
    script.write_text(ABORTING)
    for _ in range(12):  # mpiexec drops the line in some of them: each must still show it once
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCH, str(script)],
            cwd=ROOT,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=50,
        )
        assert proc.returncode == 7, proc.stderr
        assert time.monotonic() - t0 < 40  # rank 1 was killed, not waited for
        lines = proc.stderr.splitlines()
        assert lines.count("hpcai: rank 0: error: MARK the first line") == 1, proc.stderr
        assert lines.count("second line of the traceback") == 1, proc.stderr


def test_relay_passes_bytes_through_and_remembers_hpcai_lines(tmp_path: Path) -> None:
    """Progress-bar redraws (carriage returns) pass unchanged; only whole ``hpcai`` lines are remembered."""
    child = tmp_path / "child.py"
    child.write_text(
        r"""import sys; sys.stderr.write("\r 10%\r 20%hpcai: mid-line\nhpcai: whole\nhpcai: cut")"""
    )
    code = (
        "import subprocess, sys\n"
        "from hpcai.launch import _StderrRelay\n"
        f"p = subprocess.Popen([sys.executable, {str(child)!r}], stderr=subprocess.PIPE)\n"
        "r = _StderrRelay(p.stderr); p.wait(); r.join(5)\n"
        "print(sorted(r.seen))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b"\r 10%\r 20%hpcai: mid-line\nhpcai: whole\nhpcai: cut"
    assert proc.stdout.strip() == b"['hpcai: whole']"


def test_single_copy_transfers_enabled_only_where_the_kernel_allows(monkeypatch) -> None:
    """MPICH's cross-memory-attach path is asked for where process_vm_readv works; a user's choice wins."""
    from hpcai import launch

    monkeypatch.delenv("MPIR_CVAR_CH4_CMA_ENABLE", raising=False)
    monkeypatch.setattr(launch, "cma_allowed", lambda: True)
    assert launch.launch_env(2)["MPIR_CVAR_CH4_CMA_ENABLE"] == "1"
    monkeypatch.setenv("MPIR_CVAR_CH4_CMA_ENABLE", "0")
    assert launch.launch_env(2)["MPIR_CVAR_CH4_CMA_ENABLE"] == "0"
    monkeypatch.delenv("MPIR_CVAR_CH4_CMA_ENABLE")
    monkeypatch.setattr(launch, "cma_allowed", lambda: False)
    assert "MPIR_CVAR_CH4_CMA_ENABLE" not in launch.launch_env(2)
    # The probe itself: on Linux it agrees with Yama's setting (siblings need ptrace_scope 0).
    monkeypatch.undo()
    yama = Path("/proc/sys/kernel/yama/ptrace_scope")
    if sys.platform.startswith("linux") and yama.exists() and yama.read_text().strip() != "0":
        assert not launch.cma_allowed()


def test_ranks_keep_freed_memory_in_the_heap_unless_the_user_chose(monkeypatch) -> None:
    from hpcai import launch

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")
    env = launch.launch_env(2)
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20) and env["MALLOC_TRIM_THRESHOLD_"] == "4096"
