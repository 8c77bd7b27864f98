"""Parameter-server training end to end: real `mpiexec -n 3..4` subprocesses under timeouts.

Each mode trains the digits job; ssp's recorded staleness stays within its bound, bsp's is 0; a worker that
hangs or raises is handled as ps.on_worker_failure says without hanging the job; a server that hangs stops the
job and a rerun resumes from the checkpoint (server shards and optimizer state) to the same bits as an
uninterrupted run. No timing assertions: timings are `hpcai bench ps`'s business. (A worker killed by a
signal makes hydra end every rank at once: measured, documented in the README, not re-tested here.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hpcai.checkpoint import read_checkpoint
from tests.conftest import SUMMARY_KEYS, run_cli

PS_SUMMARY_KEYS = SUMMARY_KEYS | {"mode", "staleness_histogram", "updates_per_worker"}

# Short deadlines so failure tests take seconds; the sleep makes each run outlast them (and cost no CPU).
FAST_FAILURE = ["ps.timeout_s=1.5", "ps.heartbeat_s=0.3", "ps.simulate_compute_s=0.01"]


def run_ps(run_dir: Path, data: Path, sets: list[str], *extra: str, timeout: float = 120):
    args = ["run", "jobs/digits_ps.toml", "--run-dir", str(run_dir)]
    for s in [f"data.path={json.dumps(str(data))}", "checkpoint.every_seconds=0", *sets]:
        args += ["--set", s]
    return run_cli(*args, *extra, timeout=timeout)


def summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    assert PS_SUMMARY_KEYS <= s.keys()
    return s


# The bsp run on 2 servers + 2 workers serves twice: as the bsp mode test and as the uninterrupted reference
# of the resume test (the same spec), which saves a run of the ~120 s budget.
BSP_SETS = [*FAST_FAILURE, "ps.mode=bsp", "ps.servers=2", "train.steps=100", "checkpoint.every_steps=40"]


@pytest.fixture(scope="module")
def bsp_reference(tmp_path_factory: pytest.TempPathFactory, digits_dataset: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("bsp") / "run"
    proc = run_ps(run_dir, digits_dataset, BSP_SETS, "-n", "4")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return run_dir


@pytest.mark.parametrize("mode, ranks, servers", [("async", 3, 1), ("ssp", 4, 2), ("bsp", 4, 2)])
def test_mode_trains_and_records_staleness(
    tmp_path: Path, digits_dataset: Path, request: pytest.FixtureRequest, mode: str, ranks: int, servers: int
) -> None:
    if mode == "bsp":
        run_dir = request.getfixturevalue("bsp_reference")
    else:
        run_dir = tmp_path / "run"
        sets = [f"ps.mode={mode}", f"ps.servers={servers}", "ps.staleness=1", "train.steps=100"]
        proc = run_ps(run_dir, digits_dataset, sets, "-n", str(ranks))
        assert proc.returncode == 0, proc.stderr + proc.stdout
    s = summary(run_dir)
    workers = ranks - servers
    assert s["world_size"] == ranks and s["workers"] == workers and s["mode"] == mode and s["steps"] == 100
    assert s["test_accuracy"] >= 0.85, s
    assert s["updates"] == sum(s["updates_per_worker"].values()) == sum(s["staleness_histogram"].values())
    assert sorted(s["updates_per_worker"]) == [str(r) for r in range(servers, ranks)]
    assert sum(s["shard_floats"]) == s["model_parameters"] and len(s["shard_floats"]) == servers
    lags = [int(k) for k in s["staleness_histogram"]]
    if mode == "bsp":  # synchronous: one averaged update per step, every worker on the same parameters
        assert s["staleness_histogram"] == s["delay_histogram"] == {"0": s["updates"]}
        assert s["updates"] == 100 * workers and set(s["updates_per_worker"].values()) == {100}
    elif mode == "ssp":
        assert max(lags) <= 1 == s["staleness_bound"], s["staleness_histogram"]
    else:
        assert s["updates"] == 100 * workers
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 100 and records[-1]["loss"] == s["final_loss"]
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})
    assert (run_dir / "loss.png").is_file() and (run_dir / "checkpoints" / "step-00000100.h5").is_file()


@pytest.mark.parametrize(
    "how, policy",
    [("hang", "continue"), ("hang", "stop"), ("raise", "continue")],
)
def test_failing_worker_is_handled_without_hanging(
    tmp_path: Path, digits_dataset: Path, how: str, policy: str
) -> None:
    """Worker rank 2 of 3 fails computing its 10th step (9 pushed): the others finish the budget, or the job
    stops."""
    run_dir = tmp_path / "run"
    sets = [*FAST_FAILURE, f"ps.on_worker_failure={policy}", "train.batch_size=63", "train.steps=60"]
    proc = run_ps(run_dir, digits_dataset, sets, "-n", "4", "--inject-failure", f"step=10,rank=2,how={how}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hpcai:")]
    if policy == "stop":
        assert proc.returncode == 1, proc.stderr
        assert (
            len(errors) == 1 and "hpcai: rank 0: error: WorkerFailed: worker rank 2 sent nothing" in errors[0]
        )
        assert "ps.on_worker_failure = 'stop'" in errors[0]
        assert not (run_dir / "summary.json").exists()
        return
    assert proc.returncode == 0, proc.stderr + proc.stdout
    s = summary(run_dir)
    assert s["steps"] == 60 and s["test_accuracy"] >= 0.7
    assert s["updates_per_worker"]["2"] == 9 and s["updates"] == 180  # the others made up its share
    if how == "hang":  # alive and silent: declared failed, and the job ended around it (status 0)
        assert s["failed_workers"] == [2] and s["left_workers"] == []
        assert "warning: worker rank 2 sent nothing for 1.5 s (ps.timeout_s) after its step 9" in proc.stdout
        assert any("worker rank(s) 2 stopped answering" in line for line in errors)
    else:  # raised: said goodbye, finalized and exited 0
        assert s["left_workers"] == [2] and s["failed_workers"] == []
        assert any("rank 2: error: RuntimeError: injected failure at step 10; leaving" in e for e in errors)
        assert "injected failure" in (run_dir / "logs" / "rank-2.log").read_text()


def test_server_hang_stops_job_and_rerun_resumes_same_bits(
    tmp_path: Path, digits_dataset: Path, bsp_reference: Path
) -> None:
    """2 servers + 2 workers, bsp: server rank 1 hangs after step 50; workers stop the job naming it; the
    rerun resumes from step 40 (both shards and their momentum) and ends bit-identical to an uninterrupted
    run."""
    crashed = tmp_path / "crashed"
    proc = run_ps(crashed, digits_dataset, BSP_SETS, "-n", "4", "--inject-failure", "step=50,rank=1,how=hang")
    assert proc.returncode == 1, proc.stderr
    assert "error: ServerFailed: server rank(s) 1 sent no reply and no heartbeat for 1.5 s" in proc.stderr
    assert [p.name for p in (crashed / "checkpoints").glob("*.h5")] == ["step-00000040.h5"]
    ck = read_checkpoint(crashed / "checkpoints" / "step-00000040.h5")  # CRC-32s verified
    assert ck.step == 40 and ck.arrays["model/1.weight"].shape == (128, 64)  # named as in the full model
    assert ck.arrays["optimizer/state/0/momentum_buffer"].shape == (128, 64)
    assert ck.arrays["ps/worker_clocks"].tolist() == [40, 40]

    proc = run_ps(crashed, digits_dataset, BSP_SETS, "-n", "4")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "resuming from" in proc.stdout
    s = summary(crashed)
    assert s["resumed_from_step"] == 40 and s["steps"] == 100

    a = read_checkpoint(crashed / "checkpoints" / "step-00000100.h5").arrays
    b = read_checkpoint(bsp_reference / "checkpoints" / "step-00000100.h5").arrays
    for key in a:
        if key.startswith(("model/", "optimizer/")):
            assert np.array_equal(a[key], b[key]), key
    assert summary(bsp_reference)["final_loss"] == s["final_loss"]
