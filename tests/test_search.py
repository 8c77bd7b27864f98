"""Searchers and pruners (pure: no MPI, no training)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from hpcai.bench.search import FUNCTIONS, branin
from hpcai.search import (
    AshaPruner,
    MedianPruner,
    SearchExhausted,
    SpaceError,
    make_searcher,
    parse_space,
)

SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
    "width": {"type": "int", "low": 16, "high": 512},
    "act": {"type": "choice", "values": ["relu", "tanh"]},
}


@pytest.mark.parametrize("method", ["random", "bayes", "grid"])
def test_asks_stay_in_range_and_have_the_right_types(method: str) -> None:
    s = make_searcher(SPACE, method=method, seed=1, **({"candidates": 200} if method == "bayes" else {}))
    for i in range(12):
        p = s.ask()
        assert 1e-4 <= p["lr"] <= 1.0 and isinstance(p["lr"], float)
        assert 16 <= p["width"] <= 512 and isinstance(p["width"], int)
        assert p["act"] in ("relu", "tanh")
        s.tell(p, p["lr"] + i)


def test_log_scale_spreads_over_decades() -> None:
    s = make_searcher({"lr": SPACE["lr"]}, method="random", seed=0)
    lrs = np.array([s.ask()["lr"] for _ in range(400)])
    # Log-uniform on [1e-4, 1]: half below 1e-2 (linear sampling would put 1% there).
    assert 0.4 < np.mean(lrs < 1e-2) < 0.6
    grid = make_searcher({"lr": SPACE["lr"]}, method="grid", points=5)
    assert [round(math.log10(g["lr"]), 6) for g in grid.grid] == [-4, -3, -2, -1, 0]


def test_grid_is_exhaustive_then_stops() -> None:
    space = {"a": {"type": "int", "low": 1, "high": 3}, "b": {"type": "choice", "values": ["x", "y"]},
             "c": {"type": "float", "low": 0.0, "high": 1.0}}  # fmt: skip
    s = make_searcher(space, method="grid", points=3)
    assert s.size == 3 * 2 * 3
    seen = {tuple(sorted(s.ask().items())) for _ in range(s.size)}
    assert len(seen) == 18
    assert {p[2][1] for p in seen} == {0.0, 0.5, 1.0}
    with pytest.raises(SearchExhausted):
        s.ask()


@pytest.mark.parametrize("method", ["random", "bayes", "grid"])
def test_pending_asks_do_not_repeat(method: str) -> None:
    """Parallel workers ask one after another before anyone tells: a small discrete space, all distinct."""
    space = {"a": {"type": "int", "low": 0, "high": 3}, "b": {"type": "choice", "values": [1, 2]}}
    s = make_searcher(space, method=method, seed=0, **({"initial": 2} if method == "bayes" else {}))
    first = [s.ask() for _ in range(3)]
    s.tell(first[0], 1.0)
    s.tell(first[1], 2.0)  # the GP takes over with one still pending
    more = [s.ask() for _ in range(5)]
    keys = [(p["a"], p["b"]) for p in first + more]
    assert len(set(keys)) == 8  # the whole space, no point twice
    with pytest.raises(SearchExhausted):
        s.ask()


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_same_seed_same_sequence(method: str) -> None:
    def run(seed: int) -> list[dict]:
        s = make_searcher(FUNCTIONS["branin"][1], method=method, seed=seed, **({"candidates": 200} if
                          method == "bayes" else {}))  # fmt: skip
        out = []
        for _ in range(8):
            p = s.ask()
            s.tell(p, branin(p))
            out.append(p)
        return out

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_failed_trials_told_as_nan_are_avoided_not_fatal() -> None:
    s = make_searcher(FUNCTIONS["branin"][1], method="bayes", seed=0, initial=4, candidates=300)
    for i in range(8):
        p = s.ask()
        s.tell(p, float("nan") if i % 3 == 0 else branin(p))
    p = s.ask()
    assert -5 <= p["x1"] <= 10


def test_bayes_beats_random_on_branin() -> None:
    """20 evaluations, 3 seeds: the GP's median best is below 1 (the minimum is 0.398) and below random's."""

    def best(method: str, seed: int) -> float:
        s = make_searcher(FUNCTIONS["branin"][1], method=method, seed=seed,
                          **({"candidates": 300, "restarts": 1} if method == "bayes" else {}))  # fmt: skip
        values = []
        for _ in range(20):
            p = s.ask()
            values.append(branin(p))
            s.tell(p, values[-1])
        return min(values)

    bayes = statistics.median(best("bayes", seed) for seed in range(3))
    rand = statistics.median(best("random", seed) for seed in range(3))
    assert bayes < 1.0 and bayes < rand, (bayes, rand)


@pytest.mark.parametrize(
    "space, message",
    [
        ({}, "empty search space"),
        ({"x": {"type": "float", "low": 1.0, "high": 0.5}}, "inverted range"),
        ({"x": {"type": "float", "low": 1.0, "high": 1.0}}, "empty range"),
        ({"x": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "log range must be > 0"),
        ({"x": {"type": "int", "low": 0.5, "high": 3}}, "need a finite int"),
        ({"x": {"type": "choice", "values": []}}, "non-empty list"),
        ({"x": {"type": "flaot", "low": 0, "high": 1}}, "not one of float, int, choice"),
        ({"x": {"type": "float", "low": 0, "high": 1, "lgo": True}}, "unknown key 'lgo'"),
    ],
)
def test_bad_spaces_are_named(space: dict, message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        parse_space(space)


def test_median_pruner_prunes_below_median_after_startup() -> None:
    p = MedianPruner(min_epochs=2, startup_trials=2)
    for t, v in ((0, -0.9), (1, -0.8)):  # values minimised: -accuracy
        assert not p.report(t, 0, v) and not p.report(t, 1, v)
    assert not p.report(2, 0, -0.1)  # epoch 1 of 2: too early
    assert p.report(2, 1, -0.1)  # worse than the median of 0.9 and 0.8
    assert not p.report(3, 1, -0.95)


def test_asha_keeps_the_top_third_at_each_rung() -> None:
    p = AshaPruner(min_epochs=1, reduction_factor=3)
    assert not p.report(0, 0, 0.5)  # alone at rung 0: the best so far goes on
    assert p.report(1, 0, 0.7)  # fewer than 3 at the rung: only the best goes on
    assert not p.report(2, 0, 0.1)
    assert p.report(3, 0, 0.6)  # 4 values: the best 1 (4 // 3) goes on
    assert not p.report(0, 1, 0.4)  # epoch 2 < rung 1 at 3 epochs: nothing to decide
    assert not p.report(0, 2, 0.3)  # rung 1 (3 epochs): alone there


@pytest.mark.parametrize("method", ["grid", "random", "bayes"])
def test_points_handed_out_elsewhere_are_never_handed_out_again(method: str) -> None:
    """A fresh searcher (a resumed sweep, another array task) hears of points running elsewhere through
    record_pending: its own asks skip them, and a grid hands out exactly the rest, each once."""
    space = {"a": {"type": "int", "low": 0, "high": 3}, "b": {"type": "choice", "values": [1, 2]}}
    opts = {"initial": 2} if method == "bayes" else {}
    first = make_searcher(space, method=method, seed=0, **opts)
    elsewhere = [first.ask() for _ in range(3)]
    s = make_searcher(space, method=method, seed=0, **opts)  # same seed: it would start at the same points
    for p in elsewhere:
        s.record_pending(p)
    assert len(s.pending) == 3
    s.tell(elsewhere[0], 1.0)
    s.tell(elsewhere[1], 2.0)
    s.record_pending(elsewhere[1])  # told already: stays told, not pending again
    assert list(s.pending.values()) == [elsewhere[2]]
    mine = [s.ask() for _ in range(5)]
    keys = [(p["a"], p["b"]) for p in elsewhere + mine]
    assert len(set(keys)) == 8  # the whole space, no point twice
    with pytest.raises(SearchExhausted):
        s.ask()


def test_a_date_among_the_choices_is_one_line() -> None:
    """A TOML date in a choice cannot be written into a trial's job.toml (was a TypeError traceback)."""
    import datetime

    from hpcai.search import SpaceError, parse_space

    with pytest.raises(SpaceError, match=r"space.x.values\[1\]: a TOML date/time"):
        parse_space({"x": {"type": "choice", "values": [1, datetime.date(1979, 5, 27)]}}, "s.toml: space")
