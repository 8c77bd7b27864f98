"""Ending the whole job from one rank (MPI_Abort) without losing that rank's last words.

MPI_Abort makes the launcher kill every process at once. MPICH's mpiexec (hydra) forwards each rank's
stderr through a proxy, and the kill races that forwarding: measured here, a line written and flushed just
before MPI_Abort was missing from mpiexec's output in 7 of 20 runs. A job that dies without saying why is
the worst outcome on a 48-hour allocation, so the last words travel two ways:

- written to stderr, then a short pause (0.25 s) before the abort lets the launcher forward them (0 lost in
  40 runs with 0.05-0.2 s); this is the path under srun and any foreign launcher;
- when ``hpcai`` started mpiexec itself (:func:`hpcai.launch.run_ranks`), also written to a file in
  ``$HPCAI_FATAL_DIR``; the launching process prints any such message that did not come through.
"""

from __future__ import annotations

import os
import sys
import time
from typing import NoReturn

from mpi4py import MPI

from hpcai.launch import FATAL_DIR_ENV

FORWARD_PAUSE_S = 0.25


def abort_job(message: str, code: int, comm: MPI.Comm | None = None) -> NoReturn:
    """Say ``message`` (one or more lines, no trailing newline needed) and end every rank with ``code``."""
    comm = comm or MPI.COMM_WORLD
    text = message.rstrip("\n") + "\n"
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed stderr must not stop the abort
        pass
    fatal_dir = os.environ.get(FATAL_DIR_ENV)
    if fatal_dir:
        try:
            # Written under a temporary name and renamed: the launcher never reads half a message.
            rank = MPI.COMM_WORLD.Get_rank()
            tmp = os.path.join(fatal_dir, f".rank-{rank}.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(fatal_dir, f"rank-{rank}-{time.monotonic_ns()}.txt"))
        except OSError:  # another node's /tmp, or gone: stderr is still there
            pass
    if FORWARD_PAUSE_S > 0:
        time.sleep(FORWARD_PAUSE_S)
    comm.Abort(code)
    raise SystemExit(code)  # not reached: MPI_Abort does not return
