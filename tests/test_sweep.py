"""`hpcai sweep` end to end: real mpiexec worlds over the digits job with tiny settings, under timeouts."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpcai.spec import toml_string
from hpcai.sweep import load_sweep
from tests.conftest import ROOT, cli_env, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def write_sweep(
    tmp_path: Path, data: Path, body: str, sets: tuple[str, ...] = (), dir_name: str = "sweep"
) -> Path:
    """A sweep over the digits job, 2 epochs a trial, on the session's dataset, in tmp_path/DIR_NAME."""
    base_sets = [
        "train.epochs=2",
        "train.eval_every=1",
        "checkpoint.final=false",
        f"data.path={json.dumps(str(data))}",
    ]
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        f'[sweep]\nname = "t"\nbase = {json.dumps(str(ROOT / "jobs/digits.toml"))}\n'
        f"dir = {toml_string(str(tmp_path / dir_name))}\nset = {json.dumps(base_sets + list(sets))}\n" + body,
        encoding="utf-8",
    )
    return sweep


def ledger(sweep_dir: Path) -> dict[int, dict]:
    records = {}
    for line in (sweep_dir / "trials.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["trial"]] = r
    return records


RANDOM_3 = """
method = "random"
[budget]
trials = 3
[space.train.lr]
type = "float"
low = 0.01
high = 0.3
log = true
[space.model.hidden]
type = "choice"
values = [[32], [64, 32]]
"""


def test_three_rank_sweep_then_resume_without_rerunning(tmp_path: Path, digits_dataset: Path) -> None:
    """mpiexec -n 3: a coordinator and 2 groups of 1 rank; the rerun with a bigger budget adds trials only."""
    sweep = write_sweep(tmp_path, digits_dataset, RANDOM_3)
    proc = run_cli("sweep", str(sweep), "-n", "3", timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    d = tmp_path / "sweep"
    records = ledger(d)
    assert sorted(records) == [0, 1, 2] and {r["status"] for r in records.values()} == {"complete"}
    assert {r["group"] for r in records.values()} <= {0, 1} and all(r["ranks"] == 1 for r in records.values())
    for r in records.values():
        assert 0.01 <= r["params"]["train.lr"] <= 0.3 and r["params"]["model.hidden"] in ([32], [64, 32])
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert r["objective"] == summary["test_accuracy"] and summary["epochs"] == 2
    best = json.loads((d / "best.json").read_text())
    assert best["best"]["objective"] == max(r["objective"] for r in records.values())
    assert (d / "objective.png").read_bytes()[:8] == PNG and (d / "params.png").read_bytes()[:8] == PNG
    assert "best: trial" in proc.stdout and "test_accuracy" in proc.stdout

    # An interrupted run leaves a 'running' line: the rerun takes that trial again, same number and params.
    stamps = {n: (Path(r["run_dir"]) / "summary.json").stat().st_mtime_ns for n, r in records.items()}
    with open(d / "trials.jsonl", "a") as f:
        f.write(json.dumps({**records[2], "trial": 3, "status": "running", "run_dir": str(d / "trials/0003"),
                            "params": {"train.lr": 0.05, "model.hidden": [32]}}) + "\n")  # fmt: skip
    proc = run_cli("sweep", str(sweep), "-n", "3", "--set", "budget.trials=5", timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    again = ledger(d)
    assert sorted(again) == [0, 1, 2, 3, 4] and all(r["status"] == "complete" for r in again.values())
    assert again[3]["params"] == {"train.lr": 0.05, "model.hidden": [32]}
    for n, stamp in stamps.items():  # finished trials were not run again
        assert (Path(records[n]["run_dir"]) / "summary.json").stat().st_mtime_ns == stamp
    assert "3 trials already done, 1 to re-run" in proc.stdout


def test_crashing_trial_is_recorded_and_the_sweep_goes_on(tmp_path: Path, digits_dataset: Path) -> None:
    """A model factory that raises for one grid point, on both ranks of a 2-rank group: failed, then on."""
    factory = tmp_path / "model.py"
    factory.write_text(
        "from torch import nn\n\n"
        "def make_model(boom, input_shape, num_classes):\n"
        "    if boom:\n"
        "        raise RuntimeError('boom on purpose')\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
    )
    body = """
method = "grid"
[budget]
trials = 3
[parallel]
ranks_per_trial = 2
[space.model.args.boom]
type = "choice"
values = [0, 1, 2]
"""
    sweep = write_sweep(  # a sweep dir beyond the BMP: the trials' run dirs are passed on intact
        tmp_path, digits_dataset, body, (f"model.factory={json.dumps(f'{factory}:make_model')}",), "sweep🚀"
    )
    proc = run_cli("sweep", str(sweep), "-n", "3", timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    records = ledger(tmp_path / "sweep🚀")
    assert records[0]["run_dir"] == str(tmp_path / "sweep🚀" / "trials" / "0000")
    assert (tmp_path / "sweep🚀" / "trials" / "0000" / "summary.json").is_file()
    assert [records[n]["status"] for n in range(3)] == ["complete", "failed", "failed"]
    # Both ranks of the group raised and both are named: every rank learned of the failure.
    assert "rank 0: RuntimeError: boom on purpose" in records[1]["error"]
    assert "rank 1: RuntimeError: boom on purpose" in records[1]["error"]
    assert records[0]["ranks"] == 2 and records[1]["objective"] is None
    assert (Path(records[1]["run_dir"]) / "logs" / "trial-rank-1.log").is_file()


def test_pruned_trial_frees_its_group_for_the_next(tmp_path: Path, digits_dataset: Path) -> None:
    """One group (-n 2): a hopeless learning rate is pruned after its first epoch and the next trial starts.

    Grid order: lr 0.1 twice (log_every does not change training), then lr 1e-5 twice."""
    body = """
method = "grid"
[budget]
trials = 4
[early_stopping]
method = "median"
min_epochs = 1
startup_trials = 1
[space.train.lr]
type = "choice"
values = [0.1, 0.00001]
[space.train.log_every]
type = "choice"
values = [10, 11]
"""
    sweep = write_sweep(tmp_path, digits_dataset, body, ("train.epochs=3",))
    proc = run_cli("sweep", str(sweep), "-n", "2", timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    records = ledger(tmp_path / "sweep")
    assert [records[n]["status"] for n in range(4)] == ["complete", "complete", "pruned", "pruned"]
    assert records[2]["epochs"] == 1 and records[0]["epochs"] == 3
    assert records[3]["group"] == records[2]["group"] and records[3]["started"] >= records[2]["ended"]
    reports = [json.loads(line) for line in (tmp_path / "sweep/reports.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in reports if r["trial"] == 2] == [0]
    best = json.loads((tmp_path / "sweep/best.json").read_text())
    assert best["counts"] == {"complete": 2, "pruned": 2, "failed": 0, "running": 0}


GRID_4 = """
method = "grid"
[budget]
trials = 10
[space.train.lr]
type = "choice"
values = [0.1, 0.03]
[space.model.hidden]
type = "choice"
values = [[32], [64, 32]]
"""


def test_array_tasks_share_the_ledger(tmp_path: Path, digits_dataset: Path) -> None:
    """Three Slurm array tasks at once (faked: SLURM_ARRAY_* set, one rank each) on a 4-point grid, one point
    left 'running' by an earlier array job: every point is started and completed exactly once, the stale
    trial is taken over, and one task writes a best.json that names the true best."""
    sweep = write_sweep(tmp_path, digits_dataset, GRID_4, ("train.epochs=1",))
    d = tmp_path / "sweep"
    d.mkdir()
    stale = {"trial": 0, "status": "running", "params": {"train.lr": 0.1, "model.hidden": [32]},
             "owner": "41_3", "started": 0.0, "run_dir": str(d / "trials/0000")}  # fmt: skip
    (d / "trials.jsonl").write_text(json.dumps(stale) + "\n")
    cmd = [sys.executable, "-m", "hpcai", "sweep", str(sweep), "--task"]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=cli_env(SLURM_ARRAY_JOB_ID="42", SLURM_ARRAY_TASK_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(3)
    ]
    try:
        outs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert not any("Traceback" in out for out in outs), outs
    events = [json.loads(x) for x in (d / "trials.jsonl").read_text().splitlines()]
    grid = {json.dumps({"train.lr": lr, "model.hidden": h}, sort_keys=True)
            for lr in (0.1, 0.03) for h in ([32], [64, 32])}  # fmt: skip
    for status in ("running", "complete"):
        keys = [json.dumps(r["params"], sort_keys=True) for r in events[1:] if r["status"] == status]
        assert sorted(keys) == sorted(grid), status  # each point once, by this job
    records = ledger(d)
    assert sorted(records) == [0, 1, 2, 3] and all(r["status"] == "complete" for r in records.values())
    assert records[0]["params"] == stale["params"] and records[0]["owner"].startswith("42_")
    assert len({r["run_dir"] for r in records.values()}) == 4
    best = json.loads((d / "best.json").read_text())
    true_best = max(records.values(), key=lambda r: r["objective"])
    assert best["best"]["trial"] == true_best["trial"] and best["counts"]["complete"] == 4
    assert sum("best: trial" in out for out in outs) == 1  # one task wrote the report


def test_cluster_submits_a_throttled_array_through_the_slurm_renderer(
    tmp_path: Path, digits_dataset: Path
) -> None:
    from hpcai.sweep_cli import submit_array

    sweep = write_sweep(tmp_path, digits_dataset, RANDOM_3)
    spec = load_sweep(sweep)
    calls = []
    assert submit_array(spec, "local", sbatch=lambda script: calls.append(script) or "123") == 0
    script = (tmp_path / "sweep" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2%2" in script and "#SBATCH --ntasks=1" in script
    assert "-m hpcai sweep" in script and "--task" in script and str(tmp_path / "sweep/sweep.toml") in script
    assert calls == [str(tmp_path / "sweep" / "sweep.sbatch")]
    assert json.loads((tmp_path / "sweep" / "submit.json").read_text())["job_id"] == "123"


def test_unicode_sweep_dir_and_name_round_trip(tmp_path: Path, digits_dataset: Path) -> None:
    """--sweep-dir and sweep.name beyond the BMP reach the files intact (json.dumps wrote them as surrogate
    pairs that TOML rejects: exit 2, 'not valid TOML')."""
    sweep = write_sweep(tmp_path, digits_dataset, RANDOM_3)
    d = tmp_path / "s🚀"
    proc = run_cli("sweep", str(sweep), "--sweep-dir", str(d), "--set", 'sweep.name="rocket🚀"', "--cluster",
                   "local", "--dry-run")  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    script = (d / "sweep.sbatch").read_text(encoding="utf-8")
    assert str(d / "sweep.toml") in script and "rocket🚀" in script
    assert load_sweep(d / "sweep.toml").sweep.name == "rocket🚀"


@pytest.mark.parametrize(
    "edit, message",
    [
        (("high = 0.3", "high = 0.001"), "space.train.lr: inverted range: low 0.01 > high 0.001"),
        (("low = 0.01", "low = 0.0"), "space.train.lr: a log range must be > 0"),
        (("[space.train.lr]", "[space.train.learning_rate]"), "the base job has no key train.learning_rate"),
        (("method = \"random\"", "method = \"random\"\n[objective]\nkey = \"accuracy\""),
         "objective.key: 'accuracy' is never produced"),
        (("method = \"random\"", "method = \"random\"\n[budget]\ntrails = 3"), "budget.trails: unknown key"),
        (("values = [[32], [64, 32]]", "values = [[32], [0]]"), "space.model.hidden: [0] does not fit"),
        (("method = \"random\"", "method = \"random\"\n[early_stopping]\nmethod = \"median\""), "eval_every"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_trial(
    tmp_path: Path, digits_dataset: Path, edit: tuple[str, str], message: str
) -> None:
    body = RANDOM_3.replace(*edit, 1)
    if "[budget]\ntrails" in body:
        body = body.replace("[budget]\ntrials = 3\n", "")
    sets = ("train.eval_every=0",) if "median" in body else ()
    sweep = write_sweep(tmp_path, digits_dataset, body, sets)
    proc = run_cli("sweep", str(sweep), "-n", "3", timeout=60)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(sweep) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_dir_in_use_is_refused(tmp_path: Path, digits_dataset: Path) -> None:
    """Two sweeps in one directory would hand out the same trial numbers: the second stops, exit 2."""
    from hpcai.sweep import Ledger

    sweep = write_sweep(tmp_path, digits_dataset, RANDOM_3)
    with Ledger(tmp_path / "sweep").locked():
        proc = run_cli("sweep", str(sweep), "-n", "2", timeout=60)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "another sweep holds this sweep directory" in proc.stderr
    assert not (tmp_path / "sweep" / "trials.jsonl").exists()


def test_objective_comes_from_the_summary_else_the_last_metrics_record(
    tmp_path: Path, digits_dataset
) -> None:
    from hpcai.sweep import read_objective

    spec = load_sweep(write_sweep(tmp_path, digits_dataset, RANDOM_3, ()))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "lr": 0.1}\n')
    assert read_objective(spec, tmp_path, {"test_accuracy": 0.9}) == 0.9
    loss = dataclasses.replace(spec, objective=dataclasses.replace(spec.objective, key="loss"))
    assert read_objective(loss, tmp_path, {"test_accuracy": 0.9}) == 1.5
