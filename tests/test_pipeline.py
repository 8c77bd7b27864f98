"""Pipeline parallelism matches one-process training: GPipe and 1F1B, 2 and 4 stages, recompute and offload.

Real ``mpiexec -n 2|4`` runs (4 ranks oversubscribe the 2-core CI box). STEPS is kept short so the file
stays near a minute and a half; the full 100-step check of the same comparison:
``python -m tests.pipeline_reference --steps 100``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.pipeline_reference import ROOT, compare, pipeline_sets, reference_run, run_pipeline

STEPS = 20
TOL = 1e-5  # relative, per step, float32


@pytest.fixture(scope="module")
def reference(digits_dataset: Path):
    from hpcai.spec import load_spec

    sets = pipeline_sets(digits_dataset, STEPS, 2, "1f1b", 4)
    return reference_run(load_spec(ROOT / "jobs/digits.toml", sets[1::2], ranks=2))


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_matches_one_process(
    tmp_path: Path, digits_dataset: Path, reference, schedule: str, stages: int
) -> None:
    run_dir = tmp_path / "run"
    proc = run_pipeline(run_dir, pipeline_sets(digits_dataset, STEPS, stages, schedule, 4), stages)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    diff = compare(run_dir, *reference)
    assert diff["max_rel_loss_diff"] <= TOL and diff["max_rel_param_diff"] <= TOL, diff
    summary = json.loads((run_dir / "summary.json").read_text())
    p = summary["pipeline"]
    assert summary["world_size"] == stages and p["stages"] == stages and p["schedule"] == schedule
    assert summary["bubble_theory"] == pytest.approx((stages - 1) / (4 + stages - 1))
    assert 0 <= summary["bubble_fraction"] <= 1
    # Every rank's bubble is counted against its pipeline's step time: the first stage's schedule time.
    window = next(r["schedule_s"] for r in p["per_rank"] if r["stage"] == 0)
    for r in p["per_rank"]:
        assert r["bubble_fraction"] == pytest.approx(1 - r["compute_s"] / window)
    assert p["stage_imbalance"] >= 0
    # Activations in flight: GPipe holds all 4 micro-batches on every stage, 1F1B S - s on stage s.
    expect = [4] * stages if schedule == "gpipe" else [min(4, stages - s) for s in range(stages)]
    assert p["max_in_flight_per_stage"] == expect
    assert len(summary["params_sha256"]) == stages and summary["params_identical_across_ranks"]


def test_recompute_and_offload_give_the_same_losses(tmp_path: Path, digits_dataset: Path, reference) -> None:
    """Checkpointed stages recompute the same values: losses bit-identical to the plain run's."""
    plain, swapped = tmp_path / "plain", tmp_path / "swapped"
    sets = pipeline_sets(digits_dataset, STEPS, 2, "1f1b", 4)
    assert run_pipeline(plain, sets, 2).returncode == 0
    extra = ["--set", "parallel.recompute=true", "--set", "parallel.offload=true"]
    proc = run_pipeline(swapped, sets + extra, 2)
    assert proc.returncode == 0, proc.stderr
    assert _losses(swapped) == _losses(plain)
    diff = compare(swapped, *reference)
    assert diff["max_rel_loss_diff"] <= TOL, diff
    p = json.loads((swapped / "summary.json").read_text())["pipeline"]
    q = json.loads((plain / "summary.json").read_text())["pipeline"]
    assert p["recompute"] and p["offload"]
    # Recompute keeps only the stage inputs: less held for backward than the plain run.
    assert p["peak_activation_bytes_per_stage"][1] < q["peak_activation_bytes_per_stage"][1]


def test_bubble_counts_a_later_stage_against_the_pipeline_step() -> None:
    """S=2, m=4, f=1, b=2 (1F1B): the step lasts 15 on stage 0, which idles 3; stage 1 computes 12 of them,
    though its own schedule span (13, from its first wait to its last send) holds only 1 of idle."""
    from hpcai.parallel.pipeline_trace import bubble_theory, pipeline_bubble

    rows = [
        {"stage": 0, "replica": 0, "compute_s": 12.0, "schedule_s": 15.0, "bubble_fraction": 0.2},
        {"stage": 1, "replica": 0, "compute_s": 12.0, "schedule_s": 13.0, "bubble_fraction": 1 / 13},
        {"stage": 0, "replica": 1, "compute_s": 12.0, "schedule_s": 16.0, "bubble_fraction": 0.25},
        {"stage": 1, "replica": 1, "compute_s": 12.0, "schedule_s": 13.0, "bubble_fraction": 1 / 13},
    ]
    pipeline_bubble(rows)
    assert [r["bubble_fraction"] for r in rows] == pytest.approx([0.2, 0.2, 0.25, 0.25])
    assert rows[1]["bubble_own_window"] == pytest.approx(1 / 13)
    assert bubble_theory(2, 4) == pytest.approx(0.2)


NAPPING_STAGE = """
import time
from mpi4py import MPI
from torch import nn

class Nap(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
    def forward(self, x):
        self.calls += self.training
        if self.calls == 5 and MPI.COMM_WORLD.Get_rank() == 1:
            time.sleep(SLEEP)  # stage 1 stops in the middle of step 1: stage 0 waits for a gradient
        return x

def make_model():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), Nap(), nn.ReLU(), nn.Linear(32, 10)
    )
"""


def _napping_run(tmp_path: Path, dataset: Path, sleep: float, *sets: str) -> tuple:
    factory = tmp_path / "nap.py"
    factory.write_text(NAPPING_STAGE.replace("SLEEP", str(sleep)))
    run_dir = tmp_path / "run"
    args = ["run", "jobs/digits_pipeline.toml", "--run-dir", str(run_dir), "--resume", "never"]
    for kv in (
        f"model.factory={json.dumps(f'{factory}:make_model')}",
        "parallel.split=[3]",
        f"data.path={json.dumps(str(dataset))}",
        "train.steps=3",
        "comm.stall_timeout_s=1.0",
        *sets,
    ):
        args += ["--set", kv]
    t0 = time.monotonic()
    proc = run_cli(*args, timeout=150)
    summary = run_dir / "summary.json"
    return proc, time.monotonic() - t0, json.loads(summary.read_text()) if summary.exists() else None


def test_a_stalled_pipeline_receive_names_the_stage_it_waits_for(
    tmp_path: Path, digits_dataset: Path
) -> None:
    proc, _, summary = _napping_run(tmp_path, digits_dataset, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stderr.splitlines() if "stalled" in ln)
    assert line.startswith("hpcai: rank 0: stalled ")
    assert (
        "waiting for the gradient of micro-batch" in line
        and "from stage 1 (rank 1), this run's step 1" in line
    )
    assert summary["stalls"] == [line]


def test_stall_abort_ends_a_pipeline_whose_stage_stopped(tmp_path: Path, digits_dataset: Path) -> None:
    proc, seconds, summary = _napping_run(tmp_path, digits_dataset, 120, "comm.stall_abort=true")
    assert proc.returncode == 3 and summary is None
    assert "from stage 1 (rank 1)" in proc.stderr and "aborting the job (stall_abort)" in proc.stderr
    assert seconds < 90  # ended by the abort, long before stage 1 wakes up


def test_a_hung_stage_is_named_by_the_whole_job_collective(tmp_path: Path, digits_dataset: Path) -> None:
    """Stage 1 hangs between steps: stage 0 waits in the per-step flag exchange, which names rank 1."""
    args = ["run", "jobs/digits_pipeline.toml", "--run-dir", str(tmp_path / "run"), "--resume", "never"]
    for kv in (f"data.path={json.dumps(str(digits_dataset))}", "train.steps=6", "comm.stall_timeout_s=1.0"):
        args += ["--set", kv]
    args += ["--set", "comm.stall_abort=true", "--inject-failure", "step=2,rank=1,how=hang"]
    proc = run_cli(*args, timeout=150)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = next(ln for ln in proc.stderr.splitlines() if "stalled" in ln)
    assert "(max of step flags): ranks 1 have not arrived" in line


def test_pipeline_scores_a_language_model_per_token_like_one_process(tmp_path: Path) -> None:
    """The last stage counts every target token (B x T), as train.evaluate does: the same accuracy."""
    data = json.dumps(str(tmp_path / "tokens"))
    sets = [f"data.path={data}", "train.steps=6", "train.eval_every=0"]
    accuracy = {}
    for name, extra in (("one", ["-n", "1"]), ("pipe", ["-n", "2", "--set", 'train.strategy="pipeline"'])):
        args = ["run", "jobs/transformer_tokens.toml", "--run-dir", str(tmp_path / name), *extra]
        args += [a for kv in sets for a in ("--set", kv)] + ["--set", "parallel.stages=2"] * (name == "pipe")
        proc = run_cli(*args, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        accuracy[name] = json.loads((tmp_path / name / "summary.json").read_text())["test_accuracy"]
    assert 0.0 < accuracy["pipe"] <= 1.0
    assert accuracy["pipe"] == pytest.approx(accuracy["one"], abs=0.01)
