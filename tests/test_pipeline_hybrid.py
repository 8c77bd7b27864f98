"""Pipeline x data parallel, whole-model checkpoints and bit-exact resume, shape errors, bad specs, the cut,
and the trace. Real ``mpiexec`` runs of 2 and 4 ranks under timeouts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpcai import checkpoint as ckpt
from hpcai.parallel.partition import param_offsets, stage_bounds, stage_module
from tests.conftest import ROOT, cli_env, run_cli
from tests.pipeline_reference import compare, pipeline_sets, reference_run, run_pipeline


def _metrics(run_dir: Path) -> list[dict]:
    keep = ("step", "epoch", "loss", "lr")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keep} for r in rows]


def test_hybrid_two_stages_two_replicas(tmp_path: Path, digits_dataset: Path) -> None:
    """4 ranks = 2 stages x 2 replicas: matches one-process training; a stage's replicas stay identical."""
    from hpcai.spec import load_spec

    sets = pipeline_sets(digits_dataset, 15, 2, "1f1b", 4, replicas=2)
    run_dir = tmp_path / "run"
    proc = run_pipeline(run_dir, sets, 4)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    digests = summary["params_sha256"]  # world rank r = replica r // 2, stage r % 2
    assert digests[0] == digests[2] and digests[1] == digests[3] and digests[0] != digests[1]
    assert summary["params_identical_across_ranks"]
    assert summary["pipeline"]["data_replicas"] == 2
    ref = reference_run(load_spec(ROOT / "jobs/digits.toml", sets[1::2], ranks=4))
    diff = compare(run_dir, *ref)
    assert diff["max_rel_loss_diff"] <= 1e-5 and diff["max_rel_param_diff"] <= 1e-5, diff


def test_checkpoint_is_the_whole_model_and_resume_is_bit_exact(tmp_path: Path, digits_dataset: Path) -> None:
    """Kill a stage mid-run, resume from the gathered checkpoint: metrics and parameters as if unstopped."""
    sets = pipeline_sets(digits_dataset, 30, 2, "gpipe", 4)
    sets = [("train.log_every=5" if s == "train.log_every=1" else s) for s in sets]
    sets += ["--set", "checkpoint.every_steps=10", "--set", "train.optimizer=adam", "--set", "train.lr=0.003"]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert run_pipeline(reference, sets, 2).returncode == 0
    crashed = run_pipeline(run_dir, sets + ["--inject-failure", "step=14,rank=1"], 2)
    assert crashed.returncode != 0
    resumed = run_pipeline(run_dir, sets, 2)
    assert resumed.returncode == 0, resumed.stderr
    assert "step-00000010.h5" in resumed.stdout
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] == 10
    assert _metrics(run_dir) == _metrics(reference)
    a = ckpt.read_checkpoint(ckpt.list_checkpoints(reference)[-1])
    b = ckpt.read_checkpoint(ckpt.list_checkpoints(run_dir)[-1])
    assert a.arrays.keys() == b.arrays.keys()
    for key in a.arrays:
        if not key.startswith("rng/"):
            assert np.array_equal(a.arrays[key], b.arrays[key]), key
    # One file, named as in the whole model: it loads into the unsplit MLP with its optimizer (Adam moments).
    from hpcai.models import mlp
    from hpcai.spec import TrainSection
    from hpcai.train import make_optimizer

    model = mlp((64,), 10, [64, 64, 64, 64])
    opt = make_optimizer(model, TrainSection(optimizer="adam", lr=0.003))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.unpack_state(b, model, opt, sched)
    assert len(opt.state_dict()["state"]) == len(list(model.parameters()))
    assert torch.equal(model.state_dict()["9.bias"], torch.from_numpy(b.arrays["model/9.bias"]))


def test_resume_onto_another_stage_layout_is_bit_exact(tmp_path: Path, digits_dataset: Path) -> None:
    """A 2-stage run killed at step 14 resumes from its step-10 checkpoint as 4 stages: the same per-layer
    arithmetic in the same order, so the same losses and parameters as the unbroken run. (A schedule change
    may resume too, but GPipe sums micro-batch gradients in reverse order: equal to float rounding only.)"""
    sets = pipeline_sets(digits_dataset, 20, 2, "gpipe", 4)
    sets += ["--set", "checkpoint.every_steps=10", "--set", "train.optimizer=adam", "--set", "train.lr=0.003"]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert run_pipeline(reference, sets, 2).returncode == 0
    crashed = run_pipeline(run_dir, sets + ["--inject-failure", "step=14,rank=1"], 2)
    assert crashed.returncode != 0
    four = sets + ["--set", "parallel.stages=4", "--set", 'parallel.split="params"']
    resumed = run_pipeline(run_dir, four, 4)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 10 and summary["pipeline"]["stages"] == 4
    assert _metrics(run_dir) == _metrics(reference)
    a = ckpt.read_checkpoint(ckpt.list_checkpoints(reference)[-1])
    b = ckpt.read_checkpoint(ckpt.list_checkpoints(run_dir)[-1])
    for key in a.arrays:
        if key.startswith(("model/", "optimizer/")):
            assert np.array_equal(a.arrays[key], b.arrays[key]), key
    # micro_batches is not a layout: it changes what each forward sees, so the job is another one.
    other = run_pipeline(run_dir, four + ["--set", "parallel.micro_batches=8"], 4)
    assert other.returncode == 2 and "parallel.micro_batches: 4 -> 8" in other.stderr, other.stderr


def test_shape_mismatch_names_both_stages_and_ends_every_rank(tmp_path: Path, digits_dataset: Path) -> None:
    factory = tmp_path / "bad.py"
    factory.write_text(
        "from torch import nn\n\n"
        "def make_model(input_shape, num_classes):\n"
        "    # stage 0 ends with 32 features, stage 1 starts expecting 48\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(48, num_classes))\n"
    )
    sets = pipeline_sets(digits_dataset, 5, 2, "1f1b", 4)
    ref = json.dumps(f"{factory}:make_model")
    sets += ["--set", f"model.factory={ref}", "--set", "parallel.split=[3]"]
    t0 = time.perf_counter()
    proc = run_pipeline(tmp_path / "run", sets, 2, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert time.perf_counter() - t0 < 100  # generous: the point is that it ends at all
    assert "pipeline stage 1 (rank 1) cannot take the output of stage 0 (rank 0)" in proc.stderr
    assert "(32,)" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["-n", "3"], "job.ranks: world size 3 != stages 2 x data_replicas 1"),
        (["-n", "6", "--set", "parallel.data_replicas=2"], "world size 6 != stages 2 x data_replicas 2"),
        (["--set", "parallel.schedule=pipedream"], "parallel.schedule"),
        (["--set", "parallel.micro_batches=5"], "does not split into data_replicas 1 x micro_batches 5"),
        (["--set", "parallel.split=[0]"], "parallel.split: split points must be increasing and > 0"),
        (["--set", "parallel.split=[3, 5]"], "2 stages need 1 split points"),
        (["--set", "parallel.split=middle"], "parallel.split"),
        (["--set", "train.grad_accum=2"], "train.grad_accum: must be 1 for the pipeline"),
        (["--set", "parallel.stages=0"], "parallel.stages: must be >= 1"),
    ],
)
def test_bad_parallel_specs_exit_2(tmp_path: Path, sets: list[str], fragment: str) -> None:
    proc = run_cli("run", "jobs/digits_pipeline.toml", "--run-dir", str(tmp_path / "r"), *sets, timeout=60)
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
    assert "jobs/digits_pipeline.toml" in proc.stderr and not (tmp_path / "r").exists()


def test_stages_without_pipeline_strategy_rejected(tmp_path: Path) -> None:
    proc = run_cli("validate", "jobs/digits.toml", "--set", "parallel.stages=2")
    assert proc.returncode == 2 and "train.strategy = 'pipeline'" in proc.stderr


def test_more_stages_than_layers_is_a_clear_error(tmp_path: Path, digits_dataset: Path) -> None:
    sets = pipeline_sets(digits_dataset, 5, 4, "1f1b", 4) + ["--set", "model.hidden=[16]"]
    proc = run_pipeline(tmp_path / "run", sets, 4, timeout=120)
    assert proc.returncode == 2 and "only 2 layers with parameters" in proc.stderr, proc.stderr


def test_cut_by_layers_params_and_points() -> None:
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(8, 100),
        nn.ReLU(),
        nn.Linear(100, 4),
        nn.ReLU(),
        nn.Linear(4, 4),
        nn.Linear(4, 2),
    )
    assert stage_bounds(model, 2, "layers") == [0, 5, 7]  # two Linear layers each
    assert stage_bounds(model, 2, "params") == [0, 3, 7]  # 900 params alone vs 404 + 20 + 10
    assert stage_bounds(model, 3, [2, 5]) == [0, 2, 5, 7]
    bounds = stage_bounds(model, 2, "params")
    assert param_offsets(model, bounds) == [0, 2, 8]
    names = list(stage_module(model, bounds, 1).state_dict())
    assert names[0] == "3.weight"  # named as in the whole model
    whole = torch.randn(5, 8)
    out = stage_module(model, bounds, 1)(stage_module(model, bounds, 0)(whole))
    assert torch.equal(out, model(whole))


def test_trace_and_timeline_under_mpiexec(tmp_path: Path, digits_dataset: Path) -> None:
    """`mpiexec -n 2 hpcai run ... --trace`: in-process ranks; spans of every kind for every rank."""
    from hpcai.launch import find_mpiexec

    trace = tmp_path / "trace.json"
    cmd = [find_mpiexec(), "-n", "2", sys.executable, "-m", "hpcai", "run", "jobs/digits_pipeline.toml"]
    cmd += ["-n", "2", "--run-dir", str(tmp_path / "run"), "--trace", str(trace)]
    cmd += ["--set", f"data.path={json.dumps(str(digits_dataset))}", "--set", "train.steps=6"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    for rank in (0, 1):
        cats = {e.get("cat") for e in events if e.get("tid") == rank and e["ph"] == "X"}
        assert {"forward", "backward", "send", "recv"} <= cats, (rank, cats)
    assert trace.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused = run_cli("run", "jobs/digits.toml", "--trace", str(tmp_path / "t.json"), timeout=60)
    assert refused.returncode == 2 and "--trace" in refused.stderr
