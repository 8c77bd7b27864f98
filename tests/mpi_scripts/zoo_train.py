"""Train each example zoo job, shrunk, in ONE MPI world (one launch instead of three: startup dominates here).

    mpiexec -n 2 python -m mpi4py tests/mpi_scripts/zoo_train.py OUT_DIR

For each of jobs/{cnn_synthetic,transformer_tokens,resnet_synthetic}.toml: tiny generated data, 3 steps of
global batch 16, on every rank of COMM_WORLD through the same `train_job` as `hpcai run`. Rank 0 writes
OUT_DIR/results.json with each job's summary (replicas must end bit-identical: train_job raises otherwise).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mpi4py import MPI

from hpcai.spec import load_spec
from hpcai.topology import Topology
from hpcai.worker import train_job

JOBS = {
    "cnn_synthetic": "synthetic-images:n=96,size=32,classes=4",
    "transformer_tokens": "synthetic-tokens:n=96,seq=16,vocab=16",
    "resnet_synthetic": "synthetic-images:n=96,size=16,classes=4",
}

out = Path(sys.argv[1])
repo = Path(__file__).resolve().parents[2]
results = {}
for job, source in JOBS.items():
    overrides = [
        f"job.run_dir={json.dumps(str(out / job))}",
        f"data.path={json.dumps(str(out / 'data' / job))}",
        f"data.source={json.dumps(source)}",
        "train.steps=3",
        "train.batch_size=16",
    ]
    spec = load_spec(repo / "jobs" / f"{job}.toml", overrides, ranks=MPI.COMM_WORLD.Get_size())
    results[job] = train_job(spec, Topology.data_parallel(), time.time())
if MPI.COMM_WORLD.Get_rank() == 0:
    (out / "results.json").write_text(json.dumps(results, default=str))
