"""``hpcai bench search``: Bayesian against random search on Branin and Hartmann6 (functions, no training).

    hpcai bench search                               # 10 seeds, Branin @30, Hartmann6 @60, bayes and random
    hpcai bench search --seeds 3 --json search.json
    python -m hpcai.bench.search --functions branin  # the same module

For each function, method and seed the searcher runs ``budget`` sequential ask/tell rounds; the table shows
the median (over seeds) of the best value found, its gap to the known minimum, and the mean seconds per ask.
Known minima: Branin 0.397887, Hartmann6 -3.32237.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hpcai.search import make_searcher


def branin(p: dict[str, float]) -> float:
    x1, x2 = p["x1"], p["x2"]
    b, c, t = 5.1 / (4 * np.pi**2), 5 / np.pi, 1 / (8 * np.pi)
    return float((x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * np.cos(x1) + 10)


_H_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8],
                 [17, 8, 0.05, 10, 0.1, 14]])  # fmt: skip
_H_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                        [2348, 1451, 3522, 2883, 3047, 6650],
                        [4047, 8828, 8732, 5743, 1091, 381]])  # fmt: skip
_H_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann6(p: dict[str, float]) -> float:
    x = np.array([p[f"x{i}"] for i in range(1, 7)])
    return float(-np.sum(_H_ALPHA * np.exp(-np.sum(_H_A * (x - _H_P) ** 2, axis=1))))


FUNCTIONS: dict[str, tuple[Callable[[dict], float], dict, int, float]] = {
    # name: (function, space, evaluations, known minimum)
    "branin": (
        branin,
        {
            "x1": {"type": "float", "low": -5.0, "high": 10.0},
            "x2": {"type": "float", "low": 0.0, "high": 15.0},
        },
        30,
        0.397887,
    ),
    "hartmann6": (
        hartmann6,
        {f"x{i}": {"type": "float", "low": 0.0, "high": 1.0} for i in range(1, 7)},
        60,
        -3.32237,
    ),
}


def run_one(name: str, method: str, seed: int, budget: int | None = None) -> tuple[float, float]:
    """(best value, mean seconds per ask) of one sequential search."""
    fn, space, default_budget, _ = FUNCTIONS[name]
    searcher = make_searcher(space, method=method, seed=seed)
    best, ask_s = float("inf"), 0.0
    for _ in range(budget or default_budget):
        t0 = time.perf_counter()
        p = searcher.ask()
        ask_s += time.perf_counter() - t0
        v = fn(p)
        searcher.tell(p, v)
        best = min(best, v)
    return best, ask_s / (budget or default_budget)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hpcai bench search", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="seeds per function and method (default 10)")
    ap.add_argument("--functions", default="branin,hartmann6", help="comma-separated: branin, hartmann6")
    ap.add_argument("--methods", default="bayes,random", help="comma-separated: bayes, random, grid")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    names = [f for f in args.functions.split(",") if f]
    for f in names:
        if f not in FUNCTIONS:
            sys.stderr.write(
                f"hpcai bench search: error: --functions: unknown {f!r}; valid: branin, hartmann6\n"
            )
            return 2
    rows = []
    head = f"{'function':10} {'method':7} {'evals':>5} {'median best':>12} {'gap':>9} {'s/ask':>7}"
    print(f"{head}  (median over {args.seeds} seeds)")
    for name in names:
        _, _, budget, minimum = FUNCTIONS[name]
        for method in [m for m in args.methods.split(",") if m]:
            runs = [run_one(name, method, seed) for seed in range(args.seeds)]
            bests = [b for b, _ in runs]
            med = statistics.median(bests)
            per_ask = statistics.mean(s for _, s in runs)
            rows.append(
                {
                    "function": name,
                    "method": method,
                    "evaluations": budget,
                    "seeds": args.seeds,
                    "median_best": med,
                    "known_minimum": minimum,
                    "best_per_seed": bests,
                    "mean_s_per_ask": per_ask,
                }
            )
            print(
                f"{name:10} {method:7} {budget:5d} {med:12.5f} {med - minimum:9.5f} {per_ask:7.3f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
