"""StallWatch's published collective numbers, read both ways, and never blocked by a rank outside MPI.

    mpiexec -n 3 python tests/mpi_scripts/stall_check.py

Rank r enters r+2 collectives. Every rank then reads every rank's number through the node's shared-memory
window (loads) and through the RMA window (Gets, the path used for ranks on other nodes); both must give
[2, 3, 4, ...]. Then the last rank sleeps 3 s outside MPI while rank 0 reads: a load must not wait for it.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from mpi4py import MPI

from hpcai.comm.stall import StallWatch

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
watch = StallWatch(comm, timeout_s=100.0)
for _ in range(rank + 2):
    with watch.collective("test"):
        pass
comm.Barrier()
expected = np.arange(size) + 2
loaded = watch.arrived()
local, watch._local = watch._local, {}  # force the Get path, as for ranks on other nodes
fetched = watch.arrived()
watch._local = local
errors = []
if not np.array_equal(loaded, expected):
    errors.append(f"rank {rank}: loads gave {loaded.tolist()}, expected {expected.tolist()}")
if not np.array_equal(fetched, expected):
    errors.append(f"rank {rank}: Gets gave {fetched.tolist()}, expected {expected.tolist()}")
comm.Barrier()
if rank == size - 1:
    time.sleep(3.0)  # outside MPI: its progress engine does not run
elif rank == 0:
    t0 = time.monotonic()
    seen = watch.arrived()
    waited = time.monotonic() - t0
    if waited > 1.5 or not np.array_equal(seen, expected):
        errors.append(f"rank 0: read {seen.tolist()} in {waited:.2f} s while rank {size - 1} slept")
watch.close()
everyone = comm.gather(errors, root=0)
if rank == 0:
    flat = [e for es in everyone for e in es]
    for e in flat:
        print("FAIL", e, file=sys.stderr)
    print(f"stall_check: {'OK' if not flat else 'FAILED'} on {size} ranks")
    sys.exit(1 if flat else 0)
