"""Parameter-server specs, CLI flags and the shard plan (no MPI: in-process, and `hpcai run` exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpcai.errors import SpecError
from hpcai.parallel.param_server import ShardOptimizer, ShardPlan
from hpcai.parallel.ps_loops import push_scale
from hpcai.spec import PsSection, TrainSection, load_spec
from tests.conftest import ROOT, run_cli


def test_shipped_ps_job_is_valid() -> None:
    spec = load_spec(ROOT / "jobs/digits_ps.toml")
    assert spec.train.strategy == "ps" and spec.ps.servers == 1 and spec.job.ranks == 5
    assert spec.ps.mode == "async"


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("[train]\nstrategy = 'ps'\n[ps]\nmode = 'asink'\n", "ps.mode", "did you mean 'async'"),
        ("[train]\nstrategy = 'ps'\n[ps]\nservers = 0\n", "ps.servers", "must be >= 1"),
        ("[job]\nranks = 2\n[train]\nstrategy = 'ps'\n[ps]\nservers = 2\n", "job.ranks", "leave no worker"),
        ("[job]\nranks = 4\n[train]\nstrategy = 'ps'\n", "train.batch_size", "across 3 workers"),
        ("[train]\nstrategy = 'ps'\n[ps]\nstaleness = -1\n", "ps.staleness", "must be >= 0"),
        ("[train]\nstrategy = 'ps'\n[ps]\ntimeout_s = 0.5\n", "ps.timeout_s", "must exceed ps.heartbeat_s"),
        (
            "[train]\nstrategy = 'ps'\n[ps]\non_worker_failure = 'ignore'\n",
            "ps.on_worker_failure",
            "not one of",
        ),
        ("[train]\nstrategy = 'ps'\ngrad_accum = 2\n", "train.grad_accum", "must be 1"),
        ("[ps]\nstaleneess = 3\n", "ps.staleneess", "did you mean 'staleness'"),
        ("[ps]\nmode = 3\n", "ps.mode", "expected str"),
        ("[train]\nstrategy = 'pss'\n", "train.strategy", "did you mean 'ps'"),
        ("[ps]\nupdate_rule = 'match'\n", "ps.update_rule", "did you mean 'matched'"),
    ],
)
def test_bad_ps_specs_name_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and key in msg and fragment in msg and "\n" not in msg


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "ps.mode=asink"], "jobs/digits_ps.toml: ps.mode: 'asink' is not one of async, ssp, bsp"),
        (["--slow-rank", "0:4"], "--slow-rank: rank 0 is not a worker (workers are ranks 1..4)"),
        (["--slow-rank", "4"], "--slow-rank: expected RANK:FACTOR"),
        (["--inject-failure", "step=3,how=melt"], "--inject-failure: step must be >= 1"),
    ],
)
def test_cli_bad_ps_input_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli("run", "jobs/digits_ps.toml", "--run-dir", str(run_dir), *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_slow_rank_needs_ps(tmp_path: Path) -> None:
    proc = run_cli(
        "run", "jobs/digits.toml", "--run-dir", str(tmp_path / "r"), "--slow-rank", "1:4", timeout=60
    )
    assert proc.returncode == 2 and "only with train.strategy = 'ps'" in proc.stderr


@pytest.mark.parametrize("servers", [1, 2, 3, 5])
def test_shard_plan_covers_every_float_once_and_balances_bytes(servers: int) -> None:
    sizes = [8192, 128, 8192, 64, 640, 10]  # the digits MLP
    plan = ShardPlan.build(sizes, servers)
    covered = sorted((p.start, p.start + p.length) for p in plan.pieces)
    assert covered[0][0] == 0 and covered[-1][1] == sum(sizes)
    assert all(a[1] == b[0] for a, b in zip(covered[:-1], covered[1:], strict=True))  # no gap, no overlap
    assert sum(plan.shard_sizes) == sum(sizes) and len(plan.shard_sizes) == servers
    share = sum(sizes) / servers
    # Balanced by bytes: a cut moves at most half a small tensor (< share / 4) away from the ideal point.
    assert max(plan.shard_sizes) <= share * 1.25 and min(plan.shard_sizes) >= share * 0.75
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for lo, size in zip(starts[:-1], sizes, strict=True):
        owners = {p.server for p in plan.pieces if lo <= p.start < lo + size}
        assert len(owners) == 1 or size >= share / 4, (size, owners)  # only large tensors are sliced
    for s in range(servers):
        assert sum(p.length for p in plan.of(s)) == plan.shard_sizes[s]


def test_shard_plan_round_trips_through_pack_and_assemble() -> None:
    plan = ShardPlan.build([100, 7, 50, 3], 3)
    flat = np.arange(160, dtype=np.float32)
    shards = [np.zeros(n, np.float32) for n in plan.shard_sizes]
    for s, shard in enumerate(shards):
        plan.pack(flat, s, shard)
    back = np.zeros_like(flat)
    plan.assemble(np.concatenate(shards), back)
    assert np.array_equal(back, flat)


@pytest.mark.parametrize("optimizer, momentum", [("sgd", 0.9), ("sgd", 0.0), ("adam", 0.0), ("adamw", 0.0)])
def test_matched_pushes_move_parameters_like_one_data_parallel_step(optimizer: str, momentum: float) -> None:
    """ps.update_rule = "matched": W pushes of a worker's gradient g, once warmed up, move the shard as one
    step of the job's optimizer on g does, weight decay included (a wrong lr, momentum, dampening or beta
    scaling shows as a displacement off by a factor)."""
    W, g = 4, np.linspace(-1.0, 1.0, 16, dtype=np.float32)
    cfg = TrainSection(optimizer=optimizer, lr=0.01, momentum=momentum, weight_decay=0.01)
    one = ShardOptimizer(np.ones(16, np.float32), cfg, n_steps=10_000)
    matched = ShardOptimizer(np.ones(16, np.float32), cfg, n_steps=10_000, pushes_per_step=W)
    for step in range(300):  # warm up momentum buffers / Adam's averages
        one.apply(g, 1.0, step)
        for _ in range(W):
            matched.apply(g, 1.0, step)
    before_one, before_matched = one.values().copy(), matched.values().copy()
    one.apply(g, 1.0, 300)
    for _ in range(W):
        matched.apply(g, 1.0, 300)
    d_one, d_matched = one.values() - before_one, matched.values() - before_matched
    np.testing.assert_allclose(d_matched, d_one, rtol=0.03, atol=1e-7)
    if momentum:  # buffers in data parallel's units: a checkpoint resumes in any ps.mode
        np.testing.assert_allclose(matched.state("momentum_buffer"), one.state("momentum_buffer"), rtol=0.03)


def test_push_scale_damps_only_pushes_older_than_a_round() -> None:
    on, off = PsSection(), PsSection(stale_scaling=False, update_rule="plain")
    assert [push_scale(on, 4, d) for d in (0, 3, 6, 30)] == [1.0, 1.0, 0.5, 0.1]
    assert push_scale(on, 1, 0) == 1.0 and push_scale(on, 1, 5) == 0.2
    assert [push_scale(off, 4, d) for d in (0, 30)] == [0.25, 0.25]
