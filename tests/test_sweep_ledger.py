"""The sweep ledger as the one record of which trials are taken and done, in-process (no MPI, no training).

Array tasks and resumed sweeps build a fresh Scheduler from SWEEP_DIR/trials.jsonl under the ledger's lock
before every trial; these tests do the same, task after task, and check that no point or trial number is
handed out twice and that exactly one caller writes the shared report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpcai.sweep import (
    BayesSection,
    BudgetSection,
    EarlyStoppingSection,
    GridSection,
    Ledger,
    ObjectiveSection,
    ParallelSection,
    Scheduler,
    SweepSection,
    SweepSpec,
)

SPACE = {"train.lr": {"type": "choice", "values": [0.1, 0.01]},
         "train.batch_size": {"type": "choice", "values": [32, 64]}}  # fmt: skip


def make_spec(tmp_path: Path, method: str = "grid", trials: int = 10) -> SweepSpec:
    """A sweep spec built directly (the base job is never loaded here: nothing trains)."""
    return SweepSpec(
        sweep=SweepSection(name="t", base="unused.toml", dir=str(tmp_path / "sweep"), method=method),
        objective=ObjectiveSection(),
        budget=BudgetSection(trials=trials),
        parallel=ParallelSection(),
        early_stopping=EarlyStoppingSection(),
        bayes=BayesSection(initial=2, candidates=50, restarts=1),
        grid=GridSection(points=2),
        space=SPACE,
    )


def take(spec: SweepSpec, owner: str, stale=lambda r: False) -> dict | None:
    """What one array task does for each trial: a fresh Scheduler over the ledger, under its lock."""
    ledger = Ledger(spec.dir)
    with ledger.locked():
        return Scheduler(spec, ledger, stale).next_trial(owner, {"group": owner})


def finish(spec: SweepSpec, trial: int, objective: float) -> None:
    ledger = Ledger(spec.dir)
    with ledger.locked():
        Scheduler(spec, ledger, lambda r: False).finish(trial, {"status": "complete", "objective": objective})


def key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def test_array_tasks_take_each_grid_point_once(tmp_path: Path) -> None:
    """Three tasks take a 4-point grid while earlier trials are still running: every point once, each
    trial its own number and run directory, then nothing more."""
    spec = make_spec(tmp_path)
    taken = [take(spec, f"42_{i}") for i in range(3)]  # all three running at once
    finish(spec, taken[1]["trial"], 0.5)
    taken.append(take(spec, "42_1"))
    assert all(r is not None for r in taken)
    assert take(spec, "42_0") is None and take(spec, "42_2") is None  # the grid is spent
    assert sorted(key(r["params"]) for r in taken) == sorted({key(r["params"]) for r in taken})
    assert len({key(r["params"]) for r in taken}) == 4
    assert [r["trial"] for r in taken] == [0, 1, 2, 3]
    assert len({r["run_dir"] for r in taken}) == 4


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_array_tasks_never_share_a_trial_number_or_a_point(tmp_path: Path, method: str) -> None:
    spec = make_spec(tmp_path, method=method, trials=4)
    taken = [take(spec, f"42_{i}") for i in range(3)]
    finish(spec, taken[0]["trial"], 0.9)
    finish(spec, taken[2]["trial"], 0.7)
    taken.append(take(spec, "42_0"))
    assert take(spec, "42_1") is None  # budget.trials = 4
    assert [r["trial"] for r in taken] == [0, 1, 2, 3]
    assert len({key(r["params"]) for r in taken}) == 4


def test_a_resumed_sweep_reruns_a_stale_grid_point_and_hands_it_out_nowhere_else(tmp_path: Path) -> None:
    """A trial left 'running' by a killed sweep is re-run under its own number; the grid skips its point."""
    spec = make_spec(tmp_path)
    first = take(spec, "group-0")
    ledger = Ledger(spec.dir)
    with ledger.locked():
        sched = Scheduler(spec, ledger, stale=lambda r: True)  # the MPI coordinator's resume
        got = [sched.next_trial("group-0") for _ in range(5)]
    assert got[0]["trial"] == first["trial"] and got[0]["params"] == first["params"]
    assert got[4] is None and len({key(r["params"]) for r in got[:4]}) == 4


def test_the_report_is_written_once_by_whoever_sees_the_last_trial_end(tmp_path: Path) -> None:
    from hpcai.sweep_cli import report_if_done

    spec = make_spec(tmp_path, method="grid", trials=2)
    a, b = take(spec, "42_0"), take(spec, "42_1")
    ledger = Ledger(spec.dir)
    finish(spec, a["trial"], 0.8)
    with ledger.locked():
        assert report_if_done(spec, ledger) is False  # b still runs
    finish(spec, b["trial"], 0.9)
    with ledger.locked():
        assert report_if_done(spec, ledger) is True
    with ledger.locked():
        assert report_if_done(spec, ledger) is False  # the other task: already written for this ledger
    best = json.loads((spec.dir / "best.json").read_text())
    assert best["best"]["trial"] == b["trial"] and best["counts"]["complete"] == 2


def test_report_files_never_write_through_a_planted_name(tmp_path: Path) -> None:
    """Symlinks where the old fixed temporary name was (.best.json.tmp) and where a plot goes: the report
    replaces the names, the symlinks' target is untouched."""
    from hpcai.sweep import prepare_dir
    from hpcai.sweep_cli import finish_report

    spec = make_spec(tmp_path, method="grid", trials=1)
    r = take(spec, "42_0")
    finish(spec, r["trial"], 0.5)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for name in (".best.json.tmp", ".sweep.toml.tmp", "objective.png", "params.png"):
        os.symlink(victim, spec.dir / name)
    prepare_dir(spec)
    finish_report(spec, Ledger(spec.dir).trials())
    assert victim.read_text() == "precious\n"
    assert json.loads((spec.dir / "best.json").read_text())["best"]["trial"] == r["trial"]
    assert (spec.dir / "objective.png").read_bytes()[:4] == b"\x89PNG"
    assert not (spec.dir / "params.png").is_symlink()
    assert "[space]" in (spec.dir / "sweep.toml").read_text()


def test_a_trial_taken_after_a_torn_ledger_line_is_not_lost(tmp_path: Path) -> None:
    """A crash cut the ledger's last line short: the next record starts on a line of its own, so the trial
    it takes stays taken (glued onto the torn line it was unreadable and its number handed out again)."""
    spec = make_spec(tmp_path)
    take(spec, "42_0")
    with open(spec.dir / "trials.jsonl", "a") as f:
        f.write('{"trial": 1, "status": "runn')
    second, third = take(spec, "42_1"), take(spec, "42_2")
    assert second["trial"] != third["trial"] and second["params"] != third["params"]
    assert Ledger(spec.dir).trials()[second["trial"]]["owner"] == "42_1"


def test_a_symlink_planted_as_the_ledger_is_refused(tmp_path: Path) -> None:
    from hpcai.sweep import SweepError

    spec = make_spec(tmp_path)
    spec.dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, spec.dir / "trials.jsonl")
    with pytest.raises(SweepError, match="trials.jsonl: is a symbolic link"):
        take(spec, "42_0")
    assert victim.read_text() == "precious\n"


def test_objective_skips_a_torn_last_metrics_line(tmp_path: Path) -> None:
    from hpcai.sweep import read_objective

    spec = make_spec(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "test_accuracy": 0.75}\n{"step": 2, "test_acc')
    assert read_objective(spec, tmp_path, None) == 0.75
