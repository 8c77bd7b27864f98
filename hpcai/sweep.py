"""Hyperparameter sweeps: the sweep spec, the trial ledger and the scheduler that both run modes share.

    hpcai sweep jobs/digits_sweep.toml -n 5          # 1 coordinator + 4 groups of ranks_per_trial=1 (mpiexec)
    mpiexec -n 5 hpcai sweep jobs/digits_sweep.toml  # already under MPI: runs in-process
    hpcai sweep jobs/digits_sweep.toml --cluster local   # a throttled Slurm array; each task takes trials
    hpcai sweep jobs/digits_sweep.toml --report      # table, best.json and plots from SWEEP_DIR/trials.jsonl
    python -m hpcai.sweep SWEEP_DIR/sweep.toml       # what `hpcai sweep -n N` runs under mpiexec

Run the same command again to resume: finished trials are read back from SWEEP_DIR/trials.jsonl and told to
a fresh searcher; trials that were running are run again with the same number and parameters (resuming from
their own checkpoints). The MPI side (coordinator and groups) lives in :mod:`hpcai.sweep_comm`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import sys
import time
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcai.errors import UserError
from hpcai.fsio import atomic_write_text, is_no_space, no_space
from hpcai.search import METHODS, SearchExhausted, SpaceError, make_pruner, make_searcher, parse_space
from hpcai.spec import (
    _apply_override,
    _did_you_mean,
    _doc,
    _toml_value,
    build_sections,
    dumps_toml,
    load_spec,
    toml_string,
)

# What a trial produces: summary.json keys, then keys of metrics.jsonl records (the last record holding it).
SUMMARY_KEYS = ("test_accuracy", "final_loss", "wall_s", "train_s", "samples_per_s", "data_wait_fraction",
                "steps", "epochs")  # fmt: skip
METRIC_KEYS = ("loss", "lr", "samples_per_s", "wall_s", "test_accuracy")


class SweepError(UserError):
    """A sweep spec that does not validate, or a sweep directory that holds another sweep."""


@dataclass(frozen=True)
class SweepSection:
    name: str = _doc("Sweep name; also the default sweep directory runs/<name>/.", default="sweep")
    base: str = _doc(
        "The base job spec every trial starts from (relative to where you run hpcai).", default=""
    )
    dir: str = _doc("Sweep directory; empty means runs/<name>.", default="")
    method: str = _doc("grid, random or bayes.", default="bayes")
    seed: int = _doc("Seed of the searcher.", default=0)
    set: list[str] = _doc(
        "Overrides applied to the base job for every trial ('section.key=value', as `--set`).",
        default_factory=list,
    )


@dataclass(frozen=True)
class ObjectiveSection:
    key: str = _doc("A key of summary.json (or of metrics.jsonl records, the last one holding it).",
                    default="test_accuracy")  # fmt: skip
    direction: str = _doc("min or max.", default="max")


@dataclass(frozen=True)
class BudgetSection:
    trials: int = _doc("Trials in all (a grid stops earlier when it runs out).", default=20)
    wall_s: float = _doc("No new trial starts after this many seconds of this invocation (0: no limit).",
                         default=0.0)  # fmt: skip


@dataclass(frozen=True)
class ParallelSection:
    trials_at_once: int = _doc("Trials running together (MPI: groups, default -n; Slurm: the array's %M).",
                               default=2)  # fmt: skip
    ranks_per_trial: int = _doc("MPI ranks of each trial's data-parallel training.", default=1)


@dataclass(frozen=True)
class EarlyStoppingSection:
    method: str = _doc("none, median or asha (on per-epoch test_accuracy: needs train.eval_every > 0).",
                       default="none")  # fmt: skip
    min_epochs: int = _doc("No pruning before this many epochs (asha: the first rung).", default=1)
    startup_trials: int = _doc("median: other trials that must have reported at an epoch first.", default=2)
    reduction_factor: int = _doc("asha: eta; rungs at min_epochs * eta^k, the top 1/eta go on.", default=3)


@dataclass(frozen=True)
class BayesSection:
    initial: int = _doc("Latin-hypercube trials before the GP takes over (0: 2d+1).", default=0)
    candidates: int = _doc("Random candidates scored by expected improvement per ask.", default=2000)
    restarts: int = _doc("L-BFGS-B runs from the best candidates.", default=3)
    xi: float = _doc("Expected-improvement margin (in objective units).", default=0.01)
    liar: str = _doc("Value assumed for pending trials: min, mean or max of those told.", default="min")


@dataclass(frozen=True)
class GridSection:
    points: int = _doc("Values per float axis (and per int axis wider than this).", default=5)


SECTIONS: dict[str, type] = {"sweep": SweepSection, "objective": ObjectiveSection, "budget": BudgetSection,
                             "parallel": ParallelSection, "early_stopping": EarlyStoppingSection,
                             "bayes": BayesSection, "grid": GridSection}  # fmt: skip


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep: one attribute per TOML section, ``space`` as written (dotted job keys -> tables)."""

    sweep: SweepSection
    objective: ObjectiveSection
    budget: BudgetSection
    parallel: ParallelSection
    early_stopping: EarlyStoppingSection
    bayes: BayesSection
    grid: GridSection
    space: dict[str, dict[str, Any]]
    source: str = field(default="<sweep>", compare=False)

    @property
    def dir(self) -> Path:
        return Path(self.sweep.dir or f"runs/{self.sweep.name}")

    def to_dict(self) -> dict[str, Any]:
        d = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        d["space"] = self.space
        return d

    def to_toml(self) -> str:
        doc = self.to_dict()
        space = doc.pop("space")
        text = dumps_toml(doc)  # the space's keys hold dots: quoted, one inline table each
        lines = [f"{toml_string(k)} = {_toml_value(v)}\n" for k, v in space.items()]
        return text + "[space]\n" + "".join(lines)

    def searcher_options(self) -> dict[str, Any]:
        if self.sweep.method == "bayes":
            return dataclasses.asdict(self.bayes)
        return {"points": self.grid.points} if self.sweep.method == "grid" else {}

    def sign(self) -> float:
        """Searchers minimise: +1 for min, -1 for max."""
        return -1.0 if self.objective.direction == "max" else 1.0

    def trial_overrides(self, params: dict[str, Any]) -> list[str]:
        return list(self.sweep.set) + [f"{k}={_toml_value(v)}" for k, v in params.items()]


def toml_override(key: str, value: str) -> str:
    """``key=value`` for ``--set``/load_spec with ``value`` a TOML string that reads back as exactly ``value``
    (json.dumps is not one: it writes characters beyond the BMP as surrogate pairs, which TOML rejects)."""
    try:
        return f"{key}={toml_string(value)}"
    except ValueError as e:
        raise SweepError(f"{key}: {e}") from None


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``[space.train.lr]`` (nested) and ``[space."train.lr"]`` both give the key 'train.lr'."""
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict) and "type" not in v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """Read, override (``section.key=value``) and validate a sweep spec, base job included."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"{source}: no such sweep spec file")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"{source}: not valid TOML: {e}") from None
    for item in overrides:
        _apply_override(raw, item, source)
    space = raw.pop("space", None)
    sections = build_sections(raw, SECTIONS, source, SweepError)
    for name, cls in SECTIONS.items():
        sections.setdefault(name, cls())
    if not isinstance(space, dict):
        raise SweepError(f"{source}: [space]: missing; name at least one job key, e.g. [space.train.lr]")
    spec = SweepSpec(**sections, space=_flatten(space), source=source)
    validate_sweep(spec)
    return spec


def validate_sweep(spec: SweepSpec) -> None:
    """Everything that can be checked before a trial runs, base job included. Errors name file and key."""
    src = spec.source

    def fail(key: str, why: str) -> None:
        raise SweepError(f"{src}: {key}: {why}")

    s, o, b, par, es = spec.sweep, spec.objective, spec.budget, spec.parallel, spec.early_stopping
    if s.method not in METHODS:
        fail("sweep.method", f"{s.method!r} is not one of {', '.join(METHODS)}")
    if o.direction not in ("min", "max"):
        fail("objective.direction", f"{o.direction!r} is not one of min, max")
    if o.key not in SUMMARY_KEYS + METRIC_KEYS:
        valid = list(dict.fromkeys(SUMMARY_KEYS + METRIC_KEYS))
        fail("objective.key", f"{o.key!r} is never produced by a trial{_did_you_mean(o.key, valid)}")
    if b.trials < 1:
        fail("budget.trials", f"must be >= 1, got {b.trials}")
    if b.wall_s < 0:
        fail("budget.wall_s", f"must be >= 0, got {b.wall_s}")
    if par.trials_at_once < 1:
        fail("parallel.trials_at_once", f"must be >= 1, got {par.trials_at_once}")
    if par.ranks_per_trial < 1:
        fail("parallel.ranks_per_trial", f"must be >= 1, got {par.ranks_per_trial}")
    if es.method not in ("none", "median", "asha"):
        fail("early_stopping.method", f"{es.method!r} is not one of none, median, asha")
    if es.min_epochs < 1 or es.startup_trials < 1 or es.reduction_factor < 2:
        fail("early_stopping", "need min_epochs >= 1, startup_trials >= 1, reduction_factor >= 2")
    if spec.bayes.liar not in ("min", "mean", "max"):
        fail("bayes.liar", f"{spec.bayes.liar!r} is not one of min, mean, max")
    if spec.bayes.candidates < 1 or spec.bayes.restarts < 0 or spec.bayes.initial < 0:
        fail("bayes", "need candidates >= 1, restarts >= 0, initial >= 0")
    if spec.grid.points < 2:
        fail("grid.points", f"must be >= 2, got {spec.grid.points}")
    if not s.base:
        fail("sweep.base", 'name the base job spec, e.g. base = "jobs/digits.toml"')
    try:
        params = parse_space(spec.space, "space")
    except SpaceError as e:
        raise SweepError(f"{src}: {e}") from None
    try:
        base = load_spec(s.base, s.set, ranks=par.ranks_per_trial)
    except UserError as e:
        raise SweepError(f"{src}: sweep.base/sweep.set: {e}") from None
    if es.method != "none" and base.train.eval_every < 1:
        fail("early_stopping.method", f"{es.method} prunes on per-epoch test_accuracy, but the base job has "
             "train.eval_every = 0: add \"train.eval_every=1\" to sweep.set")  # fmt: skip
    for p in params:  # every end of every range, every choice: through the job spec's own checks
        _check_job_key(spec, p.name)
        for value in p.values if p.type == "choice" else (p.low, p.high):
            try:
                load_spec(s.base, [*s.set, f"{p.name}={_toml_value(value)}"], ranks=par.ranks_per_trial)
            except UserError as e:
                fail(f"space.{p.name}", f"{value!r} does not fit the base job {s.base}: {e}")


def _check_job_key(spec: SweepSpec, name: str) -> None:
    """A space key must name a key of the job spec (section.key, or deeper under a table like model.args)."""
    from hpcai.spec import SECTION_TYPES

    where = f"{spec.source}: space.{name}"
    section, _, rest = name.partition(".")
    if not rest:
        raise SweepError(f"{where}: not a job key: name it section.key, e.g. train.lr")
    if section not in SECTION_TYPES:
        raise SweepError(
            f"{where}: the base job has no section [{section}]{_did_you_mean(section, list(SECTION_TYPES))}"
        )
    key, _, deeper = rest.partition(".")
    hints = typing.get_type_hints(SECTION_TYPES[section])
    if key not in hints:
        raise SweepError(f"{where}: the base job has no key {section}.{key}{_did_you_mean(key, list(hints))}")
    if deeper and typing.get_origin(hints[key]) is not dict:
        raise SweepError(f"{where}: {section}.{key} is not a table: {name} cannot be set")


# ---------------------------------------------------------------------------------------------- ledger


class Ledger:
    """SWEEP_DIR/trials.jsonl (one JSON line per event; the last line of a trial is its state) and
    reports.jsonl (per-epoch values for pruning), guarded by an flock on SWEEP_DIR/ledger.lock.

    Array tasks on several nodes take trials through it; on a network file system flock must be supported
    (NFSv4, Lustre with flock mounts); the MPI coordinator holds the lock for its whole run.
    """

    def __init__(self, sweep_dir: Path) -> None:
        self.dir = sweep_dir
        self.trials_path = sweep_dir / "trials.jsonl"
        self.reports_path = sweep_dir / "reports.jsonl"

    @contextlib.contextmanager
    def locked(self, blocking: bool = True):
        """Hold the ledger's flock (the kernel drops it when the process dies: no stale lock)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = _open_nofollow(self.dir / "ledger.lock", os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                raise SweepError(f"{self.dir}: another sweep holds this sweep directory") from None
            yield self
        finally:
            os.close(fd)  # closing releases the flock

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the trial is re-run
        return [r for r in out if isinstance(r, dict) and isinstance(r.get("trial"), int)]

    def trials(self) -> dict[int, dict[str, Any]]:
        """Trial number -> its latest record."""
        return {r["trial"]: r for r in self._read(self.trials_path)}

    def size(self) -> int:
        """Bytes in trials.jsonl: it only grows, so this names a state of the ledger (best.json holds it)."""
        try:
            return self.trials_path.stat().st_size
        except FileNotFoundError:
            return 0

    def reports(self) -> list[dict[str, Any]]:
        return self._read(self.reports_path)

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        """One line, fsynced. After a line cut short by a crash, a newline first: glued onto the torn
        line, this record would be unreadable and its trial taken again."""
        line = json.dumps(record) + "\n"
        fd = _open_nofollow(path, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line
            data = memoryview(line.encode("utf-8"))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError as e:
            if is_no_space(e):
                raise no_space(path, e) from None
            raise
        finally:
            os.close(fd)

    def append_trial(self, record: dict[str, Any]) -> None:
        self._append(self.trials_path, record)

    def append_report(self, record: dict[str, Any]) -> None:
        self._append(self.reports_path, record)


def _open_nofollow(path: Path, flags: int) -> int:
    """Open (creating) a file of the sweep directory, never through a symlink planted under its name."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SweepError(f"{path}: is a symbolic link; hpcai does not write through one") from None
        raise


FINAL = ("complete", "pruned", "failed")


class Scheduler:
    """Trial numbers, the searcher and the pruner over a ledger. Not thread safe; callers hold the lock.

    The ledger is the one record of which trials are taken and done: a Scheduler starts from it (finished
    trials told to the searcher, running ones recorded as pending) and writes every trial it hands out to
    it before returning, all under the ledger's lock. So array tasks, which each build a fresh Scheduler
    under the lock for every trial, and a resumed sweep never hand out a point or a number twice.
    """

    def __init__(
        self, spec: SweepSpec, ledger: Ledger, stale: typing.Callable[[dict], bool], t0: float | None = None
    ) -> None:
        self.spec, self.ledger = spec, ledger
        self.t0 = t0 or time.time()  # budget.wall_s counts from here
        self.searcher = make_searcher(
            spec.space, spec.sweep.method, spec.sweep.seed, **spec.searcher_options()
        )
        self.pruner = make_pruner(spec.early_stopping)
        self.records = ledger.trials()
        self.requeue: list[int] = []
        for n, r in sorted(self.records.items()):
            if r["status"] in FINAL:  # a resume: the searcher hears every finished trial again
                self.searcher.tell(r["params"], self._value(r))
            else:  # taken: re-run here (stale) or running elsewhere now; never handed out again
                if stale(r):
                    self.requeue.append(n)
                self.searcher.record_pending(r["params"])
        for r in ledger.reports():
            self.pruner.report(r["trial"], r["epoch"], -r["value"])
        self.exhausted = False

    def _value(self, r: dict[str, Any]) -> float:
        v = r.get("objective")
        return float("nan") if r["status"] == "failed" or v is None else self.spec.sign() * float(v)

    def next_trial(self, owner: str, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The next trial (a 'running' record, already in the ledger); None: budget, time or space spent."""
        if self.spec.budget.wall_s and time.time() - self.t0 > self.spec.budget.wall_s:
            return None
        if self.requeue:
            n = self.requeue.pop(0)
            params = self.records[n]["params"]
        else:
            if self.exhausted or len(self.records) >= self.spec.budget.trials:
                return None
            try:
                params = self.searcher.ask()
            except SearchExhausted:
                self.exhausted = True
                return None
            n = max(self.records, default=-1) + 1
        record = {"trial": n, "status": "running", "params": params, "owner": owner, "started": time.time(),
                  "run_dir": str(self.spec.dir / "trials" / f"{n:04d}"), **(extra or {})}  # fmt: skip
        self.records[n] = record
        self.ledger.append_trial(record)
        return record

    def report(self, trial: int, epoch: int, test_accuracy: float) -> bool:
        """A per-epoch test accuracy; True: prune the trial now."""
        self.ledger.append_report({"trial": trial, "epoch": epoch, "value": test_accuracy})
        return self.pruner.report(trial, epoch, -test_accuracy)

    def finish(self, trial: int, result: dict[str, Any]) -> dict[str, Any]:
        record = {**self.records[trial], **result, "ended": time.time()}
        record["wall_s"] = record["ended"] - record["started"]
        self.records[trial] = record
        self.ledger.append_trial(record)
        self.searcher.tell(record["params"], self._value(record))
        return record

    def all_finished(self) -> bool:
        return all(r["status"] in FINAL for r in self.records.values())


def read_objective(spec: SweepSpec, run_dir: Path, summary: dict[str, Any] | None) -> float | None:
    """The objective of a finished trial: summary.json's key, else the last metrics.jsonl record's."""
    key = spec.objective.key
    if summary is not None and isinstance(summary.get(key), (int, float)):
        return float(summary[key])
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in reversed(metrics.read_text(encoding="utf-8", errors="replace").splitlines()):
            try:
                value = json.loads(line).get(key)
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut short (a kill, a full disk): the records before it still count
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value)
    return None


def prepare_dir(spec: SweepSpec) -> Path:
    """Create SWEEP_DIR and write sweep.toml; refuse a directory that holds a different sweep."""
    d = spec.dir
    existing = d / "sweep.toml"
    if existing.is_file():
        old = tomllib.loads(existing.read_text(encoding="utf-8"))
        new = tomllib.loads(spec.to_toml())
        keys = [("sweep", "base"), ("sweep", "set"), ("sweep", "method"), ("sweep", "seed"), ("space",),
                ("objective",)]  # fmt: skip
        diffs = []
        for path in keys:
            a, b = old, new
            for part in path:
                a, b = a.get(part), b.get(part)
            if a != b:
                diffs.append(".".join(path))
        if diffs:
            raise SweepError(
                f"{d}: holds a different sweep ({', '.join(diffs)} differ): pass another --sweep-dir, or "
                "delete it; budget, parallel and early_stopping may change between runs"
            )
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "sweep.toml", spec.to_toml())  # array tasks all write it, maybe at once
    return d


def groups_for(spec: SweepSpec, ranks: int) -> int:
    """Trial groups in an MPI world of ``ranks``: rank 0 coordinates, the rest split into groups."""
    r = spec.parallel.ranks_per_trial
    if ranks < 1 + r or (ranks - 1) % r:
        hint = 1 + r * max(1, (ranks - 1) // r)
        raise SweepError(
            f"-n {ranks}: 1 coordinator + groups of parallel.ranks_per_trial={r} ranks needs 1 + k x {r} "
            f"ranks (try -n {hint})"
        )
    return (ranks - 1) // r


def main(argv: list[str] | None = None) -> int:
    """``python -m hpcai.sweep SWEEP_DIR/sweep.toml``: every rank of the mpiexec that `hpcai sweep` starts."""
    argv = sys.argv[1:] if argv is None else argv
    from hpcai import sweep_comm

    try:
        spec = load_sweep(argv[0])
    except UserError as e:
        sys.stderr.write(f"hpcai: error: {e}\n")
        return 2
    return sweep_comm.run_mpi(spec)


if __name__ == "__main__":
    sys.exit(main())
