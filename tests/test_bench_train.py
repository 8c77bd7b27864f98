"""`hpcai bench train`: the MLPerf aggregation on made-up numbers, and one tiny real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcai.bench.train import aggregate, format_markdown, parse_args, scaling, time_to_target
from hpcai.errors import SpecError, UserError
from hpcai.spec import load_spec
from tests.conftest import run_cli


def test_five_runs_drop_fastest_and_slowest() -> None:
    r = aggregate([10.0, 12.0, 11.0, 30.0, 9.0])
    assert r["status"] == "reached" and r["mean_s"] == pytest.approx(11.0)
    assert sorted(r["kept"]) == [0, 1, 2] and sorted(r["dropped"]) == [3, 4]


def test_one_miss_is_allowed_and_counts_as_the_slowest() -> None:
    r = aggregate([10.0, None, 11.0, 12.0, 9.0])
    assert r["status"] == "reached" and r["misses"] == 1
    assert r["mean_s"] == pytest.approx(11.0)  # 9 (fastest) and the miss (slowest) dropped
    assert 1 in r["dropped"]


def test_two_misses_are_not_reached() -> None:
    r = aggregate([10.0, None, 11.0, None, 9.0])
    assert r["status"] == "not reached" and r["mean_s"] is None and "2 of 5" in r["why"]


def test_fewer_than_three_runs_keep_all_and_allow_no_miss() -> None:
    assert aggregate([4.0, 6.0])["mean_s"] == pytest.approx(5.0)
    assert aggregate([4.0, None])["status"] == "not reached"
    assert aggregate([None])["status"] == "not reached"


def test_scaling_of_times_and_rates() -> None:
    rows = [
        {"ranks": 1, "mean_s": 10.0, "samples_per_s": 100.0},
        {"ranks": 2, "mean_s": 6.0, "samples_per_s": 160.0},
        {"ranks": 4, "mean_s": None, "samples_per_s": 200.0},
    ]
    scaling(rows, "mean_s", is_time=True)
    scaling(rows, "samples_per_s", is_time=False)
    assert rows[1]["mean_s_speedup"] == pytest.approx(10 / 6)
    assert rows[1]["mean_s_efficiency"] == pytest.approx(10 / 6 / 2)
    assert rows[2]["mean_s_speedup"] is None  # not reached: no speedup
    assert rows[2]["samples_per_s_speedup"] == pytest.approx(2.0)
    assert rows[2]["samples_per_s_efficiency"] == pytest.approx(0.5)


def test_time_to_target_is_the_first_evaluation_reaching_it() -> None:
    records = [
        {"step": 10, "epoch": 0, "wall_s": 3.0},
        {"step": 22, "epoch": 0, "wall_s": 4.0, "test_accuracy": 0.9},
        {"step": 44, "epoch": 1, "wall_s": 6.5, "test_accuracy": 0.971},
        {"step": 66, "epoch": 2, "wall_s": 8.0, "test_accuracy": 0.98},
    ]
    assert time_to_target(records, "test_accuracy", 0.97) == (6.5, 2)
    assert time_to_target(records, "test_accuracy", 0.99) is None


def test_markdown_report_marks_misses() -> None:
    rows = [
        {"ranks": 1, "global_batch": 64, "status": "reached", "mean_s": 10.0, "times_s": [9.0, 10.0, 11.0]},
        {
            "ranks": 2,
            "global_batch": 64,
            "status": "not reached",
            "mean_s": None,
            "times_s": [None, None, 5.0],
        },
    ]
    for r in rows:
        r.update(epochs_mean=None, samples_per_s=100.0)
    scaling(rows, "mean_s", is_time=True)
    scaling(rows, "samples_per_s", is_time=False)
    report = {
        "job": "jobs/x.toml",
        "target": {"test_accuracy": 0.97},
        "mode": "strong",
        "runs_per_config": 3,
        "load_average_before": (1.0, 1.0, 1.0),
        "load_average_after": (2.0, 1.0, 1.0),
        "cpus": 2,
        "rows": rows,
    }
    text = format_markdown(report)
    assert "| 2 | 64 | not reached | - | miss, miss, 5.0 |" in text
    assert "fastest and slowest dropped" in text


def test_bad_arguments() -> None:
    for argv in (
        ["jobs/digits.toml", "--target", "loss=0.1"],
        ["jobs/digits.toml", "--target", "test_accuracy=1.5"],
        ["jobs/digits.toml", "-n", "0,2"],
        ["jobs/digits.toml", "--runs", "0"],
    ):
        with pytest.raises(UserError):
            parse_args(argv)
    with pytest.raises(SpecError, match="eval_every"):
        load_spec(None, ["train.stop_at_accuracy=0.9"])


def test_tiny_end_to_end(tmp_path: Path, digits_dataset: Path) -> None:
    """One run on 2 ranks, stopped at the target after its first epoch; report files written."""
    out = tmp_path / "ttt.json"
    proc = run_cli(
        "bench",
        "train",
        "jobs/digits.toml",
        "--target",
        "test_accuracy=0.3",
        "--runs",
        "1",
        "-n",
        "2",
        "--set",
        f"data.path={json.dumps(str(digits_dataset))}",
        "--set",
        "train.epochs=5",
        "--out",
        str(tmp_path / "runs"),
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "ttt.png"),
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    (run,) = report["runs"]
    assert row["status"] == "reached" and row["ranks"] == 2 and run["epochs_to_target"] == 1
    summary = json.loads((Path(run["run_dir"]) / "summary.json").read_text())
    assert summary["stopped_early"] and summary["epochs"] == 1.0  # stopped at the target, not after 5 epochs
    assert 0 < row["mean_s"] <= run["run_wall_s"]  # counted from before the launch
    assert out.with_suffix(".md").read_text().startswith("## Time to train")
    assert (tmp_path / "ttt.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------- cost model and hardware


def test_ring_allreduce_formula() -> None:
    from hpcai.bench.model import ring_allreduce_time

    a, b, g = 5e-6, 1e-9, 2e-10
    n = 8 << 20
    assert ring_allreduce_time(n, 1, a, b, g) == 0.0
    assert ring_allreduce_time(n, 4, a, b, g) == pytest.approx(2 * 3 * a + 2 * 3 / 4 * n * b + 3 / 4 * n * g)
    # our segmented ring: each step's 2 MiB chunk goes as two 1 MiB messages, each paying alpha
    assert ring_allreduce_time(n, 4, a, b, g, segment=1 << 20) == pytest.approx(
        2 * 3 * 2 * a + 2 * 3 / 4 * n * b + 3 / 4 * n * g
    )
    # the bandwidth term approaches 2 n beta as p grows
    assert ring_allreduce_time(n, 1024, 0, b, 0) == pytest.approx(2 * n * b * 1023 / 1024)


def test_pipeline_formulas() -> None:
    from hpcai.bench.model import pipeline_bubble, pipeline_step_time, ring_allreduce_time

    assert pipeline_bubble(1, 8) == 0.0
    assert pipeline_bubble(4, 32) == pytest.approx(3 / 35)
    a, b, g = 1e-5, 1e-9, 0.0
    r = pipeline_step_time(64, 4, 32, 2.0, 1 << 20, 100 << 20, a, b, g)
    slot = 2.0 / (4 * 32)
    expect_pipe = (32 + 3) * (slot + 2 * (a + (1 << 20) * b))
    assert r["replicas"] == 16 and r["pipeline_s"] == pytest.approx(expect_pipe)
    assert r["allreduce_s"] == pytest.approx(ring_allreduce_time((100 << 20) / 4, 16, a, b, g))
    assert r["step_s"] == pytest.approx(r["pipeline_s"] + r["allreduce_s"])
    # no pipeline: the whole compute on one stage, no point-to-point term, no bubble
    one = pipeline_step_time(64, 1, 32, 2.0, 1 << 20, 100 << 20, a, b, g)
    assert one["bubble"] == 0 and one["pipeline_s"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        pipeline_step_time(64, 3, 8, 1.0, 0, 0, a, b, g)


def test_alpha_beta_fit_recovers_the_constants() -> None:
    from hpcai.bench.model import PINGPONG_SIZES, compare, fit_alpha_beta

    alpha, beta = 4e-6, 2.5e-10
    sizes = [max(4, s) for s in PINGPONG_SIZES]
    a, b = fit_alpha_beta(sizes, [alpha + n * beta for n in sizes])
    assert a == pytest.approx(alpha, rel=1e-3) and b == pytest.approx(beta, rel=1e-3)
    rows = compare([{"impl": "mpi", "world_size": 2, "bytes": 1 << 20, "seconds": 1e-3}], a, b, 0.0, 1 << 20)
    assert rows[0]["predicted_s"] == pytest.approx(2 * a + (1 << 20) * b)
    assert rows[0]["measured_over_predicted"] == pytest.approx(1e-3 / rows[0]["predicted_s"])


def test_hardware_bench_skips_cuda_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpcai.bench import hardware

    assert (
        hardware.steady_rate([{"samples_per_s": 1.0}, {"samples_per_s": 5.0}, {"samples_per_s": 7.0}]) == 6.0
    )
    assert hardware.steady_rate([{"samples_per_s": 1.0}]) is None
    monkeypatch.setattr(hardware, "cuda_available", lambda: (False, "torch sees no GPU"))
    args = hardware.parse_args(["jobs/digits.toml", "--devices", "cuda", "--out", str(tmp_path)])
    report = hardware.run_bench(args)
    assert report["rows"] == [
        {"device": "cuda", "status": "skipped", "why": "torch sees no GPU", "vs_cpu": None}
    ]
    assert "skipped: torch sees no GPU" in hardware.format_markdown(report)
    with pytest.raises(UserError):
        hardware.parse_args(["jobs/digits.toml", "--devices", "tpu"])
