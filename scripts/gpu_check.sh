#!/usr/bin/env bash
# The GPU check of the benchmarking issue: ONE short run on the accelerator machine (one H100, 16 cores).
#   bash scripts/gpu_check.sh          # results under $OUT (or ./gpu-out), ~4-6 minutes
#
# Installs nothing and needs no network: only python3 with a CUDA build of torch (numpy comes with it).
# 1. env.txt             the GPU, driver, torch/CUDA versions, cores
# 2. gpu_hardware.json   scripts/gpu_hardware_bench.py: training samples/s of the model zoo (mlp, cnn,
#                        transformer, resnet) on the 16 CPU cores vs the GPU in tf32 and bf16, at the
#                        reference-figures sizes; a table on stdout (and gpu_hardware.log)
# 3. bench_hardware.*    only where mpi4py, h5py and an mpiexec are installed (not on a bare machine): the
#                        hpcai path, `hpcai bench hardware jobs/cnn_synthetic.toml` (needs train.device = "cuda",
#                        which the strategy branch adds); otherwise skipped with a note.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi missing"
  echo "cores: $(nproc)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

# 420 s at most: the report is rewritten after every model, so a timeout still leaves the finished ones.
timeout 420 "$PY" scripts/gpu_hardware_bench.py --out "$OUT/gpu_hardware.json" 2>&1 | tee "$OUT/gpu_hardware.log"
status=${PIPESTATUS[0]}

if "$PY" -c "import mpi4py, h5py, sklearn" 2>/dev/null; then
  timeout 120 "$PY" -m hpcai bench hardware jobs/cnn_synthetic.toml --steps 60 --out "$OUT/runs" \
    --json "$OUT/bench_hardware.json" 2>&1 | tee "$OUT/bench_hardware.log"
else
  echo "skipped hpcai bench hardware: mpi4py/h5py/scikit-learn not installed here (pip install -e '.[mpich]' needs the network)" \
    | tee "$OUT/bench_hardware.log"
fi
exit "$status"
