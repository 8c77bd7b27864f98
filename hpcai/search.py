"""Searchers: grid, random and Bayesian (GP + expected improvement) behind one ask/tell interface. No MPI.

    from hpcai.search import make_searcher
    s = make_searcher({"x": {"type": "float", "low": -5, "high": 10}}, method="bayes", seed=0)
    p = s.ask(); s.tell(p, f(p["x"]))          # always minimising: a sweep flips the sign for max

A space is ``{name: {"type": "float"|"int"|"choice", ...}}``: floats and ints take ``low``, ``high`` and
an optional ``log``; choices take ``values`` (any TOML values, lists included). Every searcher keeps the
trials it handed out but has not heard back about (*pending*) and never hands out the same point twice while
one is pending, so parallel workers can ask one after another; points handed out elsewhere (another process,
a run before a resume) are recorded with ``record_pending``. A failed trial is told as NaN.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpcai.errors import UserError
from hpcai.spec import plain_value


class SpaceError(UserError):
    """A search space that does not validate (empty or inverted range, log range through 0, ...)."""


class SearchExhausted(Exception):
    """The searcher has no new point to offer (a finished grid, a tiny discrete space)."""


@dataclass(frozen=True)
class Param:
    """One dimension of the space; ``encode``/``decode`` map it to and from [0, 1] (one-hot for choices)."""

    name: str
    type: str  # float, int or choice
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    values: tuple = ()

    @property
    def width(self) -> int:
        """Columns in the unit-cube encoding: one per choice (one-hot), else one."""
        return len(self.values) if self.type == "choice" else 1

    def _scale(self, v: float) -> float:
        return math.log(v) if self.log else float(v)

    def encode(self, value: Any) -> list[float]:
        if self.type == "choice":
            onehot = [0.0] * len(self.values)
            onehot[_index(self.values, value)] = 1.0
            return onehot
        lo, hi = self._scale(self.low), self._scale(self.high)
        return [0.5 if hi == lo else (self._scale(value) - lo) / (hi - lo)]

    def decode(self, u: np.ndarray) -> Any:
        if self.type == "choice":
            return self.values[int(np.argmax(u))]
        lo, hi = self._scale(self.low), self._scale(self.high)
        x = lo + float(np.clip(u[0], 0.0, 1.0)) * (hi - lo)
        x = math.exp(x) if self.log else x
        if self.type == "int":
            return int(min(max(round(x), self.low), self.high))
        return float(min(max(x, self.low), self.high))  # exp(log(x)) may stray by an ulp


def _index(values: tuple, value: Any) -> int:
    for i, v in enumerate(values):
        if v == value:
            return i
    raise ValueError(f"{value!r} is not one of {list(values)}")


def parse_space(space: dict[str, Any], where: str = "space") -> list[Param]:
    """Check a space dict and return its parameters in a fixed order (as written). Errors name the key."""
    if not isinstance(space, dict) or not space:
        raise SpaceError(f"{where}: empty search space: give at least one parameter")
    params = []
    for name, d in space.items():
        key = f"{where}.{name}"
        if not isinstance(d, dict):
            raise SpaceError(f"{key}: must be a table with a type, got {d!r}")
        kind = d.get("type")
        allowed = {"float": {"low", "high", "log"}, "int": {"low", "high", "log"}, "choice": {"values"}}
        if kind not in allowed:
            raise SpaceError(f"{key}.type: {kind!r} is not one of float, int, choice")
        extra = set(d) - allowed[kind] - {"type"}
        if extra:
            raise SpaceError(
                f"{key}: unknown key {sorted(extra)[0]!r} for a {kind}; valid: {sorted(allowed[kind])}"
            )
        if kind == "choice":
            values = d.get("values")
            if not isinstance(values, list) or not values:
                raise SpaceError(f"{key}.values: need a non-empty list of choices, got {values!r}")
            for i, v in enumerate(values):  # a TOML date cannot be written into a trial's job.toml
                try:
                    plain_value(v, f"{key}.values[{i}]")
                except UserError as e:
                    raise SpaceError(str(e)) from None
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise SpaceError(f"{key}.values: duplicate choices in {values!r}")
            params.append(Param(name, "choice", values=tuple(values)))
            continue
        lo, hi, log = d.get("low"), d.get("high"), d.get("log", False)
        for k, v in (("low", lo), ("high", hi)):
            ok = isinstance(v, int) if kind == "int" else isinstance(v, (int, float))
            if not ok or isinstance(v, bool) or not math.isfinite(v):
                raise SpaceError(f"{key}.{k}: need a finite {kind}, got {v!r}")
        if not isinstance(log, bool):
            raise SpaceError(f"{key}.log: need true or false, got {log!r}")
        if hi < lo:
            raise SpaceError(f"{key}: inverted range: low {lo} > high {hi}")
        if hi == lo:
            raise SpaceError(
                f"{key}: empty range: low == high == {lo} (fix the value in the base job instead)"
            )
        if log and lo <= 0:
            raise SpaceError(f"{key}: a log range must be > 0, got low {lo} (try low = {hi / 1e4:g})")
        params.append(Param(name, kind, float(lo) if kind == "float" else lo, hi, log))
    return params


def _key(params: dict[str, Any]) -> str:
    """Identity of a point: its JSON (floats by repr, so exact); pending/told bookkeeping uses it."""
    return json.dumps(params, sort_keys=True)


class Searcher:
    """Shared bookkeeping: told results and pending points. Subclasses implement :meth:`_propose`."""

    def __init__(self, space: dict[str, Any] | list[Param], seed: int = 0) -> None:
        self.params = space if isinstance(space, list) else parse_space(space)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.dims = sum(p.width for p in self.params)
        self.told: list[tuple[dict[str, Any], float]] = []
        self.pending: dict[str, dict[str, Any]] = {}
        self._seen: set[str] = set()  # told or pending: never handed out again
        self._told_keys: set[str] = set()

    def encode(self, params: dict[str, Any]) -> np.ndarray:
        return np.array([u for p in self.params for u in p.encode(params[p.name])], dtype=float)

    def decode(self, u: np.ndarray) -> dict[str, Any]:
        out, col = {}, 0
        for p in self.params:
            out[p.name] = p.decode(u[col : col + p.width])
            col += p.width
        return out

    def random_unit(self, n: int) -> np.ndarray:
        """``n`` uniform points of the unit cube (one-hot blocks get uniform noise; decode takes argmax)."""
        return self.rng.random((n, self.dims))

    def ask(self) -> dict[str, Any]:
        params = self._propose()
        self.record_pending(params)
        return params

    def record_pending(self, params: dict[str, Any]) -> None:
        """Record ``params`` as handed out and not yet told: by :meth:`ask`, or elsewhere (another array
        task, a run before a resume). It is never handed out again; a point already told stays told."""
        key = _key(params)
        if key in self._told_keys:
            return
        self._seen.add(key)
        self.pending[key] = dict(params)

    def tell(self, params: dict[str, Any], value: float) -> None:
        """Record ``value`` (minimised; NaN: a failed trial) for ``params``, pending or not (a resume)."""
        key = _key(params)
        self.pending.pop(key, None)
        self._seen.add(key)
        self._told_keys.add(key)
        self.told.append((dict(params), float(value)))

    def _propose(self) -> dict[str, Any]:
        raise NotImplementedError

    def _unseen_random(self, tries: int = 1000) -> dict[str, Any]:
        for _ in range(tries):
            params = self.decode(self.random_unit(1)[0])
            if _key(params) not in self._seen:
                return params
        raise SearchExhausted(f"no unseen point found in {tries} random draws: the space looks used up")


class RandomSearcher(Searcher):
    """Uniform in the unit cube (log where asked); points already told or pending are drawn again."""

    def _propose(self) -> dict[str, Any]:
        return self._unseen_random()


class GridSearcher(Searcher):
    """Every combination of ``points`` values per float (ends included), each int (or ``points`` of them when
    the range is wider) and every choice, in order; skips points already told or pending."""

    def __init__(self, space, seed: int = 0, points: int = 5) -> None:
        super().__init__(space, seed)
        if points < 2:
            raise SpaceError(f"grid.points: need >= 2, got {points}")
        axes = [self._axis(p, points) for p in self.params]
        self.grid = [dict(zip([p.name for p in self.params], combo, strict=True)) for combo in _product(axes)]
        self._next = 0

    @staticmethod
    def _axis(p: Param, points: int) -> list[Any]:
        if p.type == "choice":
            return list(p.values)
        if p.type == "int" and p.high - p.low + 1 <= points:
            return list(range(p.low, p.high + 1))
        values = [p.decode(np.array([u])) for u in np.linspace(0.0, 1.0, points)]
        return list(dict.fromkeys(values))  # ints on a log axis may round together

    @property
    def size(self) -> int:
        return len(self.grid)

    def _propose(self) -> dict[str, Any]:
        while self._next < len(self.grid):
            params = self.grid[self._next]
            self._next += 1
            if _key(params) not in self._seen:
                return params
        raise SearchExhausted(f"the grid's {len(self.grid)} points are all taken")


def _product(axes: list[list[Any]]) -> list[tuple]:
    import itertools

    return list(itertools.product(*axes))


class BayesSearcher(Searcher):
    """A Gaussian process (Matern 5/2 with one length scale per input, normalised y) over the unit cube, and
    expected improvement maximised over ``candidates`` random points plus L-BFGS-B from the best ``restarts``.

    The first ``initial`` points (default 2d+1, d = parameters) are a Latin hypercube. Pending points enter
    the fit with a constant lie (``liar``: the best value told so far, "min"; or "mean"/"max"), so parallel
    asks spread out. A NaN (failed trial) enters as the worst value told, so the search moves away from it.
    """

    def __init__(
        self,
        space,
        seed: int = 0,
        initial: int = 0,
        candidates: int = 2000,
        restarts: int = 3,
        xi: float = 0.01,
        liar: str = "min",
    ) -> None:
        super().__init__(space, seed)
        if liar not in ("min", "mean", "max"):
            raise SpaceError(f"bayes.liar: {liar!r} is not one of min, mean, max")
        self.initial = initial or 2 * len(self.params) + 1
        self.candidates, self.restarts, self.xi, self.liar = candidates, restarts, xi, liar
        from scipy.stats import qmc

        design = qmc.LatinHypercube(d=self.dims, seed=seed).random(self.initial)
        self._design = [self.decode(u) for u in design]
        self._theta: np.ndarray | None = None  # last fit's kernel hyper-parameters: the next fit starts there

    def _propose(self) -> dict[str, Any]:
        finite = [v for _, v in self.told if math.isfinite(v)]
        if len(self.told) + len(self.pending) < self.initial or len(finite) < 2:
            for params in self._design:
                if _key(params) not in self._seen:
                    return params
            return self._unseen_random()
        return self._suggest(finite)

    def _fit(self, finite: list[float]):
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        worst = max(finite)
        lie = {"min": min(finite), "mean": float(np.mean(finite)), "max": worst}[self.liar]
        xs = [self.encode(p) for p, _ in self.told] + [self.encode(p) for p in self.pending.values()]
        ys = [v if math.isfinite(v) else worst for _, v in self.told] + [lie] * len(self.pending)
        kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(
            np.full(self.dims, 0.5), (1e-2, 1e2), nu=2.5
        ) + WhiteKernel(1e-6, (1e-10, 1e-1))
        if self._theta is not None:
            kernel = kernel.clone_with_theta(self._theta)
        gp = GaussianProcessRegressor(
            kernel, normalize_y=True, n_restarts_optimizer=1, random_state=self.seed + len(self.told)
        )
        with warnings.catch_warnings():  # bounds hit on tiny samples: harmless, and noisy on the terminal
            warnings.simplefilter("ignore")
            gp.fit(np.array(xs), np.array(ys))
        self._theta = gp.kernel_.theta
        return gp, min(finite)

    def expected_improvement(self, gp, best: float, x: np.ndarray) -> np.ndarray:
        """EI for minimisation at rows of ``x``: E[max(best - xi - f(x), 0)]."""
        from scipy.stats import norm

        mu, sigma = gp.predict(np.atleast_2d(x), return_std=True)
        sigma = np.maximum(sigma, 1e-12)
        imp = best - self.xi - mu
        z = imp / sigma
        return imp * norm.cdf(z) + sigma * norm.pdf(z)

    def _snap(self, u: np.ndarray) -> np.ndarray:
        """Round ints and choices the way decode does, so EI is scored at points we could really run."""
        return self.encode(self.decode(u))

    def _suggest(self, finite: list[float]) -> dict[str, Any]:
        from scipy.optimize import minimize

        gp, best = self._fit(finite)
        # Uniform candidates explore; a quarter sit close to the best points told so far, because EI's
        # optimum is often a small step from the incumbent and uniform draws rarely land that close.
        n_local = self.candidates // 4
        ok = [(p, v) for p, v in self.told if math.isfinite(v)]
        top = [self.encode(p) for p, _ in sorted(ok, key=lambda t: t[1])[:3]]
        scale = self.rng.choice([0.1, 0.02, 0.005], size=(n_local, 1))
        local = np.array(top)[self.rng.integers(len(top), size=n_local)] + scale * self.rng.standard_normal(
            (n_local, self.dims)
        )
        raw = np.vstack([self.random_unit(self.candidates - n_local), np.clip(local, 0.0, 1.0)])
        cand = np.array([self._snap(u) for u in raw])
        ei = self.expected_improvement(gp, best, cand)
        order = np.argsort(-ei)
        starts = [cand[i] for i in order[: self.restarts]]
        results = [(float(ei[i]), cand[i]) for i in order[: 4 * self.restarts]]
        for x0 in starts:  # polish the best candidates; the box is the unit cube
            res = minimize(
                lambda x: -float(self.expected_improvement(gp, best, x)[0]),
                x0,
                method="L-BFGS-B",
                bounds=[(0.0, 1.0)] * self.dims,
                options={"maxiter": 50},
            )
            snapped = self._snap(res.x)
            results.append((float(self.expected_improvement(gp, best, snapped)[0]), snapped))
        results.sort(key=lambda r: -r[0])
        for _, u in results:
            params = self.decode(u)
            if _key(params) not in self._seen:
                return params
        return self._unseen_random()


METHODS = {"grid": GridSearcher, "random": RandomSearcher, "bayes": BayesSearcher}


def make_searcher(
    space: dict[str, Any] | list[Param], method: str = "bayes", seed: int = 0, **options
) -> Searcher:
    """A searcher with ``ask() -> dict`` and ``tell(params, value)`` (minimising) over ``space``.

    ``options``: grid ``points``; bayes ``initial``, ``candidates``, ``restarts``, ``xi``, ``liar``.
    """
    if method not in METHODS:
        import difflib

        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpaceError(f"method: {method!r} is not one of {', '.join(METHODS)}{hint}")
    return METHODS[method](space, seed=seed, **options)


# ---------------------------------------------------------------------------------------------- pruners


class Pruner:
    """Never prunes. ``report(trial, epoch, value) -> bool`` (value minimised): True ends the trial now.

    A pruner's state is a function of the reports it heard, in order: replaying a sweep's reports.jsonl
    rebuilds it (resume, Slurm array tasks).
    """

    def report(self, trial: int, epoch: int, value: float) -> bool:
        return False


class MedianPruner(Pruner):
    """Prune a trial whose value at an epoch is worse than the median of the other trials' values at that
    epoch, once ``startup_trials`` others reported there and ``min_epochs`` epochs are done."""

    def __init__(self, min_epochs: int = 1, startup_trials: int = 2) -> None:
        self.min_epochs, self.startup_trials = min_epochs, startup_trials
        self.history: dict[int, dict[int, float]] = {}  # epoch -> trial -> value

    def report(self, trial: int, epoch: int, value: float) -> bool:
        at = self.history.setdefault(epoch, {})
        at[trial] = value
        others = [v for t, v in at.items() if t != trial and math.isfinite(v)]
        if epoch + 1 < self.min_epochs or len(others) < self.startup_trials:
            return False
        return not value <= float(np.median(others))  # NaN is pruned too


class AshaPruner(Pruner):
    """Asynchronous successive halving: rungs at ``min_epochs * eta**k`` epochs; a trial reaching a rung goes
    on only if its value is within the best 1/eta of all values seen at that rung so far (with fewer than
    eta values there, only if it is the best), as Optuna's SuccessiveHalvingPruner decides."""

    def __init__(self, min_epochs: int = 1, reduction_factor: int = 3) -> None:
        self.min_epochs, self.eta = min_epochs, reduction_factor
        self.rungs: dict[int, list[float]] = {}
        self.next_rung: dict[int, int] = {}  # trial -> index of the next rung it has to pass

    def report(self, trial: int, epoch: int, value: float) -> bool:
        done = epoch + 1
        k = self.next_rung.get(trial, 0)
        while done >= self.min_epochs * self.eta**k:
            values = self.rungs.setdefault(k, [])
            values.append(value if math.isfinite(value) else math.inf)
            k += 1
            self.next_rung[trial] = k
            ranked = sorted(values)
            idx = max(len(ranked) // self.eta - 1, 0)
            if not value <= ranked[idx]:
                return True
        return False


def make_pruner(cfg: Any) -> Pruner:
    """From a sweep's [early_stopping] section (method none, median or asha)."""
    if cfg.method == "median":
        return MedianPruner(cfg.min_epochs, cfg.startup_trials)
    if cfg.method == "asha":
        return AshaPruner(cfg.min_epochs, cfg.reduction_factor)
    return Pruner()
