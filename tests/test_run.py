"""`hpcai run` end to end with real mpiexec subprocesses (2-3 ranks oversubscribing the 2-core CI box)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from hpcai.launch import find_mpiexec
from tests.conftest import ROOT, SUMMARY_KEYS, cli_env, run_cli

METRIC_KEYS = {"step", "epoch", "loss", "lr", "samples_per_s", "wall_s"}


def check_run_dir(run_dir: Path, world: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["world_size"] == world
    # Replicas end bit-identical: one SHA-256 of the parameters per rank, all equal.
    assert len(summary["params_sha256"]) == world and len(set(summary["params_sha256"])) == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(METRIC_KEYS <= r.keys() for r in records)
    assert records[-1]["step"] == summary["steps"]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [f"rank-{r}.log" for r in range(world)]
    assert "[train]" in (run_dir / "job.toml").read_text()
    return summary


def test_default_job_reaches_accuracy_with_two_ranks(tmp_path: Path) -> None:
    """The README's main job as shipped (dataset built on the fly), 2 ranks: test accuracy >= 0.95."""
    run_dir = tmp_path / "run"
    data = tmp_path / "data" / "digits"
    proc = run_cli(
        "run", "jobs/digits.toml", "--run-dir", str(run_dir), "--set", f"data.path={json.dumps(str(data))}"
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert (data / "manifest.json").is_file()
    summary = check_run_dir(run_dir, 2)
    assert summary["test_accuracy"] >= 0.95, summary
    assert summary["epochs"] == 20 and summary["final_loss"] < 0.1
    assert "test accuracy" in proc.stdout and "Traceback" not in proc.stderr


def test_three_ranks_cnn_in_process_under_mpiexec(tmp_path: Path, digits_dataset: Path) -> None:
    """Started by mpiexec already, `hpcai run` trains in-process (no nested launch); odd rank count."""
    run_dir = tmp_path / "run"
    cmd = [find_mpiexec(), "-n", "3", sys.executable, "-m", "hpcai", "run", "jobs/digits.toml"]
    cmd += ["--run-dir", str(run_dir), "--set", f"data.path={json.dumps(str(digits_dataset))}"]
    cmd += ["--set", "train.batch_size=63", "--set", "train.steps=30", "--set", "model.name=cnn", "-n", "3"]
    import subprocess

    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = check_run_dir(run_dir, 3)
    assert summary["steps"] == 30


def test_rank_failure_ends_every_rank_promptly(tmp_path: Path, digits_dataset: Path) -> None:
    """A factory that raises on rank 1 only: rank 0 waits in a collective, yet the job ends in seconds."""
    factory = tmp_path / "model.py"
    factory.write_text(
        "from mpi4py import MPI\nfrom torch import nn\n\n"
        "def make_model(input_shape, num_classes):\n"
        "    if MPI.COMM_WORLD.Get_rank() == 1:\n"
        "        raise RuntimeError('factory exploded on purpose')\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
    )
    t0 = time.monotonic()
    proc = run_cli(
        "run",
        "jobs/digits.toml",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"data.path={json.dumps(str(digits_dataset))}",
        "--set",
        f"model.factory={json.dumps(f'{factory}:make_model')}",
        timeout=90,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hpcai: rank")]
    assert lines == [
        f"hpcai: rank 1: error: RuntimeError: factory exploded on purpose (traceback in "
        f"{tmp_path / 'run' / 'logs' / 'rank-1.log'})"
    ], proc.stderr
    assert "factory exploded" in (tmp_path / "run" / "logs" / "rank-1.log").read_text()
    assert elapsed < 60  # a generous bound that still catches a hang (the timeout above would fire at 90)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_missing_dataset_without_source_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli(
        "run",
        "jobs/digits.toml",
        "--set",
        "data.source=''",
        "--set",
        "data.path='nowhere'",
        "--run-dir",
        str(tmp_path / "r"),
        timeout=60,
    )
    assert proc.returncode == 2
    assert "data.path: no dataset at nowhere" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("world", [1, 2])
def test_single_and_dual_rank_short_runs(tmp_path: Path, digits_dataset: Path, world: int) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        "run",
        "jobs/digits.toml",
        "-n",
        str(world),
        "--run-dir",
        str(run_dir),
        "--set",
        f"data.path={json.dumps(str(digits_dataset))}",
        "--set",
        "train.steps=25",
        "--set",
        "train.optimizer='adam'",
        "--set",
        "train.lr=0.01",
    )
    assert proc.returncode == 0, proc.stderr
    summary = check_run_dir(run_dir, world)
    assert summary["steps"] == 25 and summary["test_accuracy"] > 0.5


def test_grad_accum_matches_plain_steps_closely(tmp_path: Path, digits_dataset: Path) -> None:
    """4 micro-batches per rank, one all-reduce a step: the same training up to float rounding."""
    data = ["--set", f"data.path={json.dumps(str(digits_dataset))}", "--set", "train.steps=40"]
    runs = {}
    for k in (1, 4):
        run_dir = tmp_path / f"k{k}"
        proc = run_cli(
            "run", "jobs/digits.toml", "--run-dir", str(run_dir), *data, "--set", f"train.grad_accum={k}"
        )
        assert proc.returncode == 0, proc.stderr
        runs[k] = check_run_dir(run_dir, 2)
    assert runs[4]["final_loss"] == pytest.approx(runs[1]["final_loss"], rel=1e-4)
    bad = run_cli("validate", "jobs/digits.toml", "--set", "train.grad_accum=3", timeout=60)
    assert bad.returncode == 2 and "does not split into 2 ranks x 3 micro-batches" in bad.stderr


def test_under_mpiexec_the_spec_is_checked_against_the_real_world(
    tmp_path: Path, digits_dataset: Path
) -> None:
    """Under mpiexec -n 3 without -n: the batch of 64 is checked against 3 ranks, said once, exit 2."""
    import subprocess

    base = [sys.executable, "-m", "hpcai", "run", "jobs/digits.toml", "--run-dir", str(tmp_path / "r")]
    base += ["--set", f"data.path={json.dumps(str(digits_dataset))}", "--set", "train.steps=10"]
    bad = subprocess.run(
        [find_mpiexec(), "-n", "3", *base],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    errors = [line for line in bad.stderr.splitlines() if line.startswith("hpcai: error:")]
    expected = (
        "hpcai: error: jobs/digits.toml: train.batch_size: global batch 64 does not divide across 3 ranks"
    )
    assert errors == [expected + " (try 63)"], bad.stderr
    cmd = [find_mpiexec(), "-n", "2", *base, "-n", "4"]
    mismatch = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert mismatch.returncode == 2 and "-n 4: this MPI world has 2 ranks" in mismatch.stderr
    assert not (tmp_path / "r").exists()
