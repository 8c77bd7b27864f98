"""One-process training over the same batches as a pipeline run, and the comparison of the two.

Used by tests/test_pipeline.py (short runs) and on its own for the full check, 100 steps, both schedules,
S = 2 and 4 (about a minute and a half on the 2-core CI box)::

    python -m tests.pipeline_reference --steps 100
    python -m tests.pipeline_reference --steps 100 --schedules 1f1b --stages 4 --micro-batches 8

The reference is plain full-batch training (no micro-batches): same seed, same model, same optimizer and
schedule, batches from the same loader at rank 0 of 1. A pipeline run must log the same loss every step
(``train.log_every = 1``) and end with the same parameters (read from its final whole-model checkpoint).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hpcai import checkpoint as ckpt
from hpcai.data.loader import BatchLoader
from hpcai.data.shards import ShardedDataset
from hpcai.launch import find_mpiexec
from hpcai.models import build_model
from hpcai.spec import JobSpec, load_spec
from hpcai.train import lr_lambda, make_optimizer, total_steps

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = "[64, 64, 64, 64]"  # five Linear layers: enough for 4 stages


def reference_run(spec: JobSpec) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses and final state_dict of one-process, full-batch training of ``spec``."""
    torch.manual_seed(spec.train.seed)
    data = ShardedDataset(spec.data.path)
    model = build_model(spec.model, data.sample_shape, data.num_classes, seed=spec.train.seed)
    loader = BatchLoader(data.splits["train"], spec.train.batch_size, 0, 1, spec.train.seed, prefetch=0)
    opt = make_optimizer(model, spec.train)
    n = total_steps(spec.train, loader.steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec.train, n))
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []
    epoch = 0
    while len(losses) < n:
        for x, y in loader.epoch(epoch):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if len(losses) == n:
                break
        epoch += 1
    data.close()
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def pipeline_sets(
    data: Path, steps: int, stages: int, schedule: str, micro: int, replicas: int = 1
) -> list[str]:
    sets = {
        "train.strategy": '"pipeline"',
        "parallel.stages": str(stages),
        "parallel.data_replicas": str(replicas),
        "parallel.micro_batches": str(micro),
        "parallel.schedule": f'"{schedule}"',
        "model.hidden": HIDDEN,
        "train.steps": str(steps),
        "train.log_every": "1",
        "train.batch_size": "64",
        "data.path": json.dumps(str(data)),
        "data.source": '""',
        "checkpoint.every_seconds": "0",
    }
    out: list[str] = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def compare(run_dir: Path, ref_losses: list[float], ref_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest relative differences of per-step losses and of final parameters (whole-model checkpoint)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = np.array([r["loss"] for r in records])
    ref = np.array(ref_losses)
    assert len(losses) == len(ref), (len(losses), len(ref))
    loss_rel = float(np.max(np.abs(losses - ref) / np.abs(ref)))
    final = ckpt.read_checkpoint(ckpt.list_checkpoints(run_dir)[-1])
    param_rel = 0.0
    for name, t in ref_state.items():
        got = final.arrays[f"model/{name}"]
        scale = max(float(np.abs(t.numpy()).max()), 1e-12)
        param_rel = max(param_rel, float(np.abs(got - t.numpy()).max()) / scale)
    return {"max_rel_loss_diff": loss_rel, "max_rel_param_diff": param_rel}


def env() -> dict[str, str]:
    from tests.conftest import cli_env

    return cli_env()


def run_pipeline(
    run_dir: Path, sets: list[str], ranks: int, timeout: float = 300
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "hpcai",
        "run",
        "jobs/digits.toml",
        "-n",
        str(ranks),
        "--run-dir",
        str(run_dir),
    ]
    return subprocess.run(cmd + sets, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--schedules", default="gpipe,1f1b")
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--data", default=str(ROOT / "data/digits"))
    args = ap.parse_args(argv)
    print(f"mpiexec: {find_mpiexec()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stages in (int(s) for s in args.stages.split(",")):
            for schedule in args.schedules.split(","):
                sets = pipeline_sets(Path(args.data), args.steps, stages, schedule, args.micro_batches)
                spec = load_spec(ROOT / "jobs/digits.toml", sets[1::2], ranks=stages)
                ref_losses, ref_state = reference_run(spec)
                run_dir = Path(tmp) / f"{schedule}-{stages}"
                t0 = time.perf_counter()
                proc = run_pipeline(run_dir, sets, stages)
                if proc.returncode:
                    print(proc.stdout, proc.stderr)
                    return 1
                diff = compare(run_dir, ref_losses, ref_state)
                rows.append({"schedule": schedule, "stages": stages, **diff, "s": time.perf_counter() - t0})
                print(json.dumps(rows[-1]), flush=True)
    worst = max(r["max_rel_loss_diff"] for r in rows)
    print(f"worst relative loss difference over {args.steps} steps: {worst:.3g} (limit 1e-5)")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
