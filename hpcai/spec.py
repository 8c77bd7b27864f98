"""Job specs: typed, immutable, validated before any rank starts.

A job spec is a TOML file with the sections below; every key has a default except where noted. Unknown
keys, wrong types and impossible values raise :class:`~hpcai.errors.SpecError` naming the file and key::

    hpcai validate jobs/digits.toml
    hpcai validate jobs/digits.toml --set train.lr=0.2 -n 4

The resolved spec (defaults filled in, overrides applied) is written to every run directory as
``job.toml`` so a run can be repeated exactly with ``hpcai run RUN_DIR/job.toml``.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcai.errors import SpecError, UserError


def _doc(text: str, **kw: Any) -> Any:
    """A dataclass field whose docstring travels in its metadata (shown in README and errors)."""
    return field(metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class JobSection:
    name: str = _doc("Job name; also the default run directory runs/<name>/.", default="digits")
    ranks: int = _doc("Number of MPI ranks `hpcai run` starts (overridden by -n).", default=2)
    run_dir: str = _doc("Run directory; empty means runs/<name>.", default="")


@dataclass(frozen=True)
class ModelSection:
    name: str = _doc(
        "Built-in model: mlp, cnn, resnet or transformer (see Model zoo). Ignored when factory is set.",
        default="mlp",
    )
    hidden: list[int] = _doc("Hidden layer widths of the mlp.", default_factory=lambda: [128, 64])
    channels: list[int] = _doc(
        "Conv channels of the cnn; stage widths of the resnet.", default_factory=lambda: [16, 32]
    )
    blocks: int = _doc("Residual blocks per stage of the resnet.", default=2)
    d_model: int = _doc("Width of the transformer (embedding and attention).", default=64)
    layers: int = _doc("Blocks of the transformer.", default=2)
    heads: int = _doc("Attention heads of the transformer (must divide d_model).", default=4)
    factory: str = _doc(
        "Your own model: 'path/to/file.py:make_model' returning a torch nn.Module; called with "
        "model.args, plus input_shape and num_classes if its signature takes them.",
        default="",
    )
    args: dict[str, Any] = _doc("Keyword arguments for the factory.", default_factory=dict)


@dataclass(frozen=True)
class DataSection:
    path: str = _doc("Sharded HDF5 dataset directory (holds manifest.json).", default="data/digits")
    source: str = _doc(
        "What to build at `path` if it is missing: 'digits' (scikit-learn's bundled set), "
        "'synthetic-images[:k=v,...]' or 'synthetic-tokens[:k=v,...]' (see `hpcai data build`), or '' to "
        "require an existing dataset.",
        default="digits",
    )
    shards: int = _doc("Shard files per split when the dataset is built.", default=4)
    test_fraction: float = _doc("Fraction of samples held out as the test split when built.", default=0.2)
    split_seed: int = _doc("Seed of the train/test split when built.", default=0)
    prefetch: int = _doc("Batches read ahead by a background thread (0: read inline).", default=2)


@dataclass(frozen=True)
class TrainSection:
    strategy: str = _doc(
        "Parallel strategy: 'data' (synchronous data parallel), 'pipeline' (stages x data replicas, see "
        "[parallel]) or 'ps' (parameter servers, see [ps]).",
        default="data",
    )
    optimizer: str = _doc("sgd, adam or adamw.", default="sgd")
    lr: float = _doc("Peak learning rate.", default=0.1)
    momentum: float = _doc("SGD momentum.", default=0.9)
    weight_decay: float = _doc("Weight decay.", default=0.0)
    lr_schedule: str = _doc("constant or cosine (decays to 0 at the last step).", default="cosine")
    warmup_steps: int = _doc("Linear warm-up steps.", default=0)
    batch_size: int = _doc("Global batch size, split evenly across the ranks.", default=64)
    grad_accum: int = _doc(
        "Micro-batches per rank per step: gradients accumulate locally, one all-reduce per step.", default=1
    )
    epochs: int = _doc("Epochs to train (used when steps is 0).", default=20)
    steps: int = _doc("Optimizer steps to train; wins over epochs when > 0.", default=0)
    seed: int = _doc("Seed of initial parameters and of the per-epoch shuffle.", default=0)
    log_every: int = _doc("Steps between metrics.jsonl records (the last step is always logged).", default=10)
    eval_every: int = _doc(
        "Evaluate on the test split every this many epochs, logged as test_accuracy (0: only at the end).",
        default=0,
    )
    stop_at_accuracy: float = _doc(
        "Stop after the first evaluation (eval_every) whose test_accuracy reaches this (0: off); "
        "`hpcai bench train` sets it to its target.",
        default=0.0,
    )
    device: str = _doc(
        "cpu, or cuda (each rank uses cuda:<local rank>; gradients go through host memory for MPI).",
        default="cpu",
    )
    on_nonfinite: str = _doc(
        "A NaN/inf loss or gradient norm: 'stop' ends the job naming the step (exit 4, no checkpoint of "
        "that state), 'skip' drops that step's update on every rank and goes on (as AMP's GradScaler does), "
        "stopping too after 10 skipped steps in a row or on non-finite parameters.",
        default="stop",
    )


@dataclass(frozen=True)
class CommSection:
    bucket_mb: float = _doc("Gradient bucket size in MiB (all-reduced while backward runs).", default=25.0)
    first_bucket_mb: float = _doc(
        "Size of the first bucket (ready soonest) and of the last (its all-reduce hides behind nothing).",
        default=1.0,
    )
    overlap: bool = _doc("All-reduce buckets on a communication thread while backward runs.", default=True)
    compression: str = _doc(
        "Gradients on the wire: none, fp16 or bf16 (float32 kept for the optimizer).", default="none"
    )
    stall_timeout_s: float = _doc(
        "Report a collective that waits longer than this, naming the ranks not arrived (0: off).",
        default=60.0,
    )
    stall_abort: bool = _doc("End the job when a stall is reported.", default=False)


@dataclass(frozen=True)
class ParallelSection:
    """Pipeline (model) parallelism, read when ``train.strategy = "pipeline"``: ranks = stages x replicas."""

    stages: int = _doc(
        "Pipeline stages: the model's layers are cut into this many consecutive parts, one per rank of a "
        "pipeline.",
        default=1,
    )
    micro_batches: int = _doc(
        "Micro-batches per replica's share of a global batch; gradients accumulate over them (the "
        "pipeline's gradient accumulation), one data-parallel all-reduce after the last.",
        default=4,
    )
    schedule: str = _doc(
        "gpipe (all forwards, then all backwards: m micro-batches of activations held) or 1f1b "
        "(PipeDream-flush: at most `stages` held on the first stage).",
        default="1f1b",
    )
    data_replicas: int = _doc(
        "Copies of the whole pipeline, each on its part of every global batch; a stage's replicas "
        "average gradients with the ring all-reduce.",
        default=1,
    )
    split: str | list[int] = _doc(
        "Where to cut the model: 'layers' (equal counts of layers with parameters), 'params' (balanced "
        "parameter counts), or explicit split points: stages-1 increasing indices into the nn.Sequential "
        "where a new stage starts.",
        default="layers",
    )
    recompute: bool = _doc(
        "Activation checkpointing per stage: keep only each micro-batch's stage input, recompute the rest "
        "in backward (torch.utils.checkpoint).",
        default=False,
    )
    offload: bool = _doc(
        "Move saved activations to host memory until backward (saved-tensor hooks); on a CPU-only run the "
        "code path runs but moves nothing.",
        default=False,
    )


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = _doc("Checkpoint every this many optimizer steps (0: not by steps).", default=0)
    every_seconds: float = _doc(
        "Checkpoint when this many seconds passed since the last (0: not by time).", default=600.0
    )
    keep: int = _doc(
        "Checkpoints kept in RUN_DIR/checkpoints/ (older ones deleted after a newer commits).", default=3
    )
    async_save: bool = _doc(
        "Snapshot to host memory and write in a background thread while training goes on.", default=False
    )
    final: bool = _doc(
        "Write a checkpoint when training ends (what `hpcai predict` and a rerun use).", default=True
    )


@dataclass(frozen=True)
class PsSection:
    # Read by hpcai/parallel/param_server.py when train.strategy = "ps"; ignored otherwise.
    servers: int = _doc(
        "Server ranks (the first ones) holding the parameters and optimizer state, sharded by bytes; the "
        "other job.ranks - servers ranks are workers.",
        default=1,
    )
    mode: str = _doc(
        "Consistency: 'async' (apply each push at once), 'ssp' (a worker runs at most `staleness` steps "
        "ahead of the slowest) or 'bsp' (synchronous rounds: one averaged update per step).",
        default="async",
    )
    staleness: int = _doc("Bound of ssp: steps a worker may run ahead of the slowest live worker.", default=2)
    update_rule: str = _doc(
        "How async and ssp apply a push (one worker's gradient, a 1/W share of the global batch): "
        "'matched' makes W pushes move the parameters as one data-parallel step does (lr / W, momentum "
        "and Adam's betas to the power 1/W, buffers in the same units); 'plain' applies gradient / W with "
        "the job's optimizer as configured (momentum decays W times per global step).",
        default="matched",
    )
    stale_scaling: bool = _doc(
        "async and ssp: a push computed on parameters more than W - 1 updates old (W workers) is scaled "
        "by (W - 1) / delay (staleness-aware asynchronous SGD), so a straggler's old gradient counts less.",
        default=True,
    )
    heartbeat_s: float = _doc(
        "Seconds between a server's heartbeats to workers whose reply it holds back (ssp, bsp).", default=1.0
    )
    timeout_s: float = _doc(
        "A worker silent this long after its last reply is declared failed; a worker that hears nothing "
        "from a server this long stops the job. Must exceed the slowest step.",
        default=30.0,
    )
    on_worker_failure: str = _doc(
        "'continue' with the remaining workers, or 'stop' the job (a rerun resumes from the last "
        "checkpoint).",
        default="continue",
    )
    simulate_compute_s: float = _doc(
        "Extra seconds each worker sleeps per step, standing in for a bigger model (benchmarks).",
        default=0.0,
    )


@dataclass(frozen=True)
class SlurmSection:
    nodes: int = _doc("Nodes to allocate.", default=1)
    tasks_per_node: int = _doc("MPI ranks per node; 0 means job.ranks / nodes.", default=0)
    cpus_per_task: int = _doc("Cores per rank (also OMP_NUM_THREADS).", default=1)
    gpus_per_node: int = _doc("GPUs per node.", default=0)
    time: str = _doc(
        "Time limit (Slurm syntax, e.g. 01:00:00); empty means the profile's default.", default=""
    )
    mem: str = _doc("Memory per node (e.g. 8G); empty means the profile's default.", default="")
    # The keys below are read by `hpcai render/submit` (hpcai/slurm.py), which also checks their formats.
    mem_per_cpu: str = _doc(
        "Memory per core; excludes mem and mem_per_gpu (any memory key set here "
        "replaces the profile's memory default).",
        default="",
    )
    mem_per_gpu: str = _doc("Memory per GPU; excludes mem and mem_per_cpu.", default="")
    template: str = _doc(
        "Batch script template (templates/NAME.sbatch.j2 or a path); empty: the profile's.", default=""
    )
    signal_lead_s: int = _doc(
        "Seconds before the time limit that the batch shell gets USR1 (checkpoint and "
        "requeue); 0: the profile's.",
        default=0,
    )
    max_requeues: int = _doc(
        "Requeues after checkpoint-and-exit before giving up; -1: the profile's.", default=-1
    )


@dataclass(frozen=True)
class JobSpec:
    """A whole job: one attribute per TOML section."""

    job: JobSection = field(default_factory=JobSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    comm: CommSection = field(default_factory=CommSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    ps: PsSection = field(default_factory=PsSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    source: str = field(default="<defaults>", compare=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.job.run_dir or f"runs/{self.job.name}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in _sections()}

    def spec_hash(self) -> str:
        """SHA-256 of the resolved spec (stable key order): identifies 'the same job' across restarts."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


def _sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(JobSpec) if f.name != "source"]


SECTION_TYPES: dict[str, type] = {f.name: f.default_factory().__class__ for f in _sections()}  # type: ignore[misc]

CHOICES: dict[str, tuple[str, ...]] = {
    "model.name": ("mlp", "cnn", "resnet", "transformer"),
    "train.strategy": ("data", "pipeline", "ps"),
    "parallel.schedule": ("gpipe", "1f1b"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.device": ("cpu", "cuda"),
    "train.on_nonfinite": ("stop", "skip"),
    "comm.compression": ("none", "fp16", "bf16"),
    "ps.mode": ("async", "ssp", "bsp"),
    "ps.on_worker_failure": ("continue", "stop"),
    "ps.update_rule": ("matched", "plain"),
}


# ---------------------------------------------------------------------------------------------- loading


def load_spec(path: str | Path | None, overrides: list[str] = (), ranks: int | None = None) -> JobSpec:
    """Read, override and validate a job spec. ``path=None`` gives the embedded default job.

    ``overrides`` are ``section.key=value`` strings (value parsed as TOML, else taken as a string);
    ``ranks`` (from ``-n``) overrides ``job.ranks``.
    """
    source = display_path(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not _is_file(p):
            from hpcai.resources import shipped_dir

            shipped = shipped_dir("jobs") / p.name
            hint = f" (hpcai ships an example of that name: {shipped})" if _is_file(shipped) else ""
            raise SpecError(f"{source}: no such job spec file{hint}")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))  # TOML is UTF-8 whatever the locale
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{source}: not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise SpecError(f"{source}: not a text file (TOML is UTF-8)") from None
        except OSError as e:
            raise SpecError(f"{source}: cannot read: {e.strerror}") from None
    for item in overrides:
        _apply_override(raw, item, source)
    if ranks is not None:
        raw.setdefault("job", {})["ranks"] = ranks
    spec = _build(raw, source)
    validate(spec)
    return spec


def spec_from_toml(text: str, source: str) -> JobSpec:
    """A resolved spec sent as TOML text (the launcher's to its ranks), validated again; errors name
    ``source``, the file the user wrote."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: not valid TOML: {e}") from None
    spec = _build(raw, source)
    validate(spec)
    return spec


def _is_file(path: Path) -> bool:
    """Path.is_file, False for a path the OS will not even look up (too long, NUL, no permission)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def display_path(path: str | Path) -> str:
    """``path`` for messages, and for UTF-8 files: bytes of a file name that are not UTF-8 (which Python
    holds as lone surrogates) shown as ``\\xff``."""
    text = str(path)
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _apply_override(raw: dict[str, Any], item: str, source: str) -> None:
    """``section.key=value`` (``--set``): the value is TOML, or else a bare word taken as a string.

    A value that starts like a TOML string, array or table but does not parse is an error (taking it as
    text would set a name with its quotes in it); a bare word that TOML reads as a date or time is text
    (no key takes a date: --set job.name=2024-05-01 means the name).
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise SpecError(f"{source}: --set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as e:
        if text.strip()[:1] in ("'", '"', "[", "{"):
            raise SpecError(f"{source}: {key}: --set value {_short(text)} is not valid TOML: {e}") from None
        value = text  # a bare word like --set model.name=cnn
    if isinstance(value, (datetime.date, datetime.time)):
        value = text.strip()
    section, _, name = key.partition(".")
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise SpecError(f"{source}: {section}: must be a table")
    *parents, leaf = name.split(".")
    where = section
    for part in parents:  # model.args.width=3
        where += f".{part}"
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise SpecError(
                f"{source}: {where}: is {type(target).__name__} {_short(target)}, not a table: "
                f"cannot set {key}"
            )
    target[leaf] = value


def _did_you_mean(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys: {', '.join(valid)}"


def build_sections(
    raw: dict[str, Any], section_types: dict[str, type], source: str, error: type[UserError] = SpecError
) -> dict[str, Any]:
    """TOML tables -> typed section dataclasses; an unknown section or key, or a wrong type, raises ``error``
    naming the file and key (with a did-you-mean). Shared by job specs, cluster profiles and sweep specs."""
    sections: dict[str, Any] = {}
    for sec_name, value in raw.items():
        if sec_name not in section_types:
            raise error(
                f"{source}: unknown section [{sec_name}]{_did_you_mean(sec_name, list(section_types))}"
            )
        if not isinstance(value, dict):
            raise error(f"{source}: {sec_name}: must be a table, got {type(value).__name__}")
        cls = section_types[sec_name]
        hints = typing.get_type_hints(cls)
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, v in value.items():
            if key not in hints:
                raise error(f"{source}: {sec_name}.{key}: unknown key{_did_you_mean(key, valid)}")
            try:
                kwargs[key] = _coerce(v, hints[key], f"{source}: {sec_name}.{key}")
            except SpecError as e:
                raise error(str(e)) from None
        sections[sec_name] = cls(**kwargs)
    return sections


def _build(raw: dict[str, Any], source: str) -> JobSpec:
    return JobSpec(**build_sections(raw, SECTION_TYPES, source), source=source)


INT64 = (-(2**63), 2**63 - 1)  # TOML's integers; tomllib reads bigger ones without complaint


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against a type hint (int, float, str, bool, list[X], dict[str, X], X | Y, Any).

    Beyond the type: integers fit in 64 bits, floats are finite, strings hold no NUL (no path, argument or
    environment variable can) and can be written back as UTF-8; ``Any`` is plain data (see plain_value).
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return plain_value(value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64[0] <= value <= INT64[1]:
                raise SpecError(f"{where}: {value} is out of range (TOML integers are 64-bit)")
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise SpecError(f"{where}: must be a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return _check_str(value, where)
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, value_tp = typing.get_args(tp) or (str, Any)
            return {
                _check_str(k, f"{where}: key {k!r}"): _coerce(v, value_tp, f"{where}.{_key_name(k)}")
                for k, v in value.items()
            }
    elif isinstance(tp, types.UnionType):
        closest = None  # an option of the right kind with a bad value says more than "expected X | Y"
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except SpecError as e:
                if ": expected " not in str(e):
                    closest = e
        if closest is not None:
            raise closest
    expected = getattr(tp, "__name__", str(tp))
    raise SpecError(f"{where}: expected {expected}, got {type(value).__name__} {_short(value)}")


def _check_str(value: str, where: str) -> str:
    if "\0" in value:
        raise SpecError(f"{where}: {_short(value)} holds a NUL character")
    bad = _lone_surrogate(value)
    if bad is not None:
        raise SpecError(f"{where}: {_short(value)} {bad}")
    return value


def plain_value(value: Any, where: str) -> Any:
    """What a model's keyword arguments can be: numbers, strings, bools, and lists and tables of them.
    A TOML date/time cannot be written back to job.toml by hpcai nor mean anything to a model: refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _coerce(value, int, where)
    if isinstance(value, float):
        return _coerce(value, float, where)
    if isinstance(value, str):
        return _check_str(value, where)
    if isinstance(value, list):
        return [plain_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return _coerce(value, dict[str, Any], where)
    what = "a TOML date/time" if isinstance(value, (datetime.date, datetime.time)) else type(value).__name__
    raise SpecError(f"{where}: {what} ({value}) is not a number, string, bool, list or table; quote it")


def _key_name(k: str) -> str:
    """A key as TOML would spell it in a dotted path: bare if it can be, else quoted."""
    return k if k and all(c.isascii() and (c.isalnum() or c in "-_") for c in k) else repr(k)


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value, cut to ``limit`` characters: a 100 kB string makes no readable error line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]} ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------- validation


def validate(spec: JobSpec) -> None:
    """Check values that types alone cannot: ranges, choices, divisibility, files that must exist."""
    src = spec.source

    def fail(key: str, why: str) -> None:
        raise SpecError(f"{src}: {key}: {why}")

    for key, allowed in CHOICES.items():
        sec, name = key.split(".")
        value = getattr(getattr(spec, sec), name)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail(key, f"{value!r} is not one of {', '.join(allowed)}{hint}")
    j, t, d, m = spec.job, spec.train, spec.data, spec.model
    if not j.name or any(c in j.name for c in "/\\\0") or j.name in (".", ".."):
        fail("job.name", f"must be a non-empty name without '/', got {_short(j.name)}")
    _check_path("job.name", j.name, fail)  # the default run directory's name
    _check_path("job.run_dir", j.run_dir, fail)
    if not d.path:
        fail("data.path", "must not be empty (the dataset directory)")
    _check_path("data.path", d.path, fail)
    _validate_ranges(spec, fail)
    if j.ranks < 1:
        fail("job.ranks", f"must be >= 1, got {j.ranks}")
    if t.lr <= 0:
        fail("train.lr", f"must be > 0, got {t.lr}")
    if not 0 <= t.momentum < 1:
        fail("train.momentum", f"must be in [0, 1), got {t.momentum}")
    if t.weight_decay < 0:
        fail("train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    if t.batch_size < 1:
        fail("train.batch_size", f"must be >= 1, got {t.batch_size}")
    if t.strategy == "ps":
        _validate_ps(spec, fail)
    elif t.strategy == "pipeline":
        _validate_pipeline(spec, fail)
    elif t.batch_size % j.ranks:
        fail(
            "train.batch_size",
            f"global batch {t.batch_size} does not divide across {j.ranks} ranks "
            f"(try {max(j.ranks, t.batch_size // j.ranks * j.ranks)})",
        )
    elif spec.parallel.stages != 1 or spec.parallel.data_replicas != 1:
        fail("parallel.stages", "pipeline stages and replicas need train.strategy = 'pipeline'")
    if t.grad_accum < 1:
        fail("train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    elif t.strategy == "ps" and t.grad_accum != 1:
        fail("train.grad_accum", f"must be 1 with train.strategy = 'ps', got {t.grad_accum}")
    elif t.strategy == "data" and t.batch_size % (j.ranks * t.grad_accum):
        fail(
            "train.grad_accum",
            f"global batch {t.batch_size} does not split into {j.ranks} ranks x {t.grad_accum} micro-batches",
        )
    if t.epochs < 0 or t.steps < 0 or (t.epochs == 0 and t.steps == 0):
        fail("train.epochs", f"set epochs or steps to a positive number (epochs={t.epochs}, steps={t.steps})")
    if t.warmup_steps < 0:
        fail("train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    if t.eval_every < 0:
        fail("train.eval_every", f"must be >= 0, got {t.eval_every}")
    if not 0 <= t.stop_at_accuracy <= 1:
        fail("train.stop_at_accuracy", f"must be in [0, 1], got {t.stop_at_accuracy}")
    if t.stop_at_accuracy > 0 and t.eval_every == 0:
        fail("train.stop_at_accuracy", "needs train.eval_every > 0 (accuracy is only known when evaluated)")
    if t.log_every < 1:
        fail("train.log_every", f"must be >= 1, got {t.log_every}")
    if d.shards < 1:
        fail("data.shards", f"must be >= 1, got {d.shards}")
    if not 0 < d.test_fraction < 1:
        fail("data.test_fraction", f"must be in (0, 1), got {d.test_fraction}")
    if d.prefetch < 0:
        fail("data.prefetch", f"must be >= 0, got {d.prefetch}")
    from hpcai.data.synthetic import is_generated, parse_source  # numpy only: cheap

    if d.source not in ("", "digits") and not d.source.startswith("synthetic-"):
        fail(
            "data.source",
            f"{d.source!r} is not one of 'digits', 'synthetic-images[:k=v,...]', "
            "'synthetic-tokens[:k=v,...]', '' (use `hpcai data build` for other data)",
        )
    if is_generated(d.source):
        try:
            parse_source(d.source)
        except UserError as e:
            fail("data.source", str(e))
    if not d.source and not _is_file(Path(d.path) / "manifest.json"):
        fail("data.path", f"no dataset at {d.path} (manifest.json missing) and data.source is empty")
    if any(h < 1 for h in m.hidden):
        fail("model.hidden", f"widths must be >= 1, got {m.hidden}")
    if not m.channels or any(c < 1 for c in m.channels):
        fail("model.channels", f"channels must be >= 1 (at least one), got {m.channels}")
    for key in ("blocks", "d_model", "layers", "heads"):
        if getattr(m, key) < 1:
            fail(f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    if m.d_model % m.heads:
        fail("model.heads", f"{m.heads} heads do not divide d_model {m.d_model}")
    if not m.factory:
        _validate_model_size(m, fail)
    if m.factory:
        file, sep, func = m.factory.rpartition(":")
        if not sep or not file or not func.isidentifier():
            fail("model.factory", f"expected 'path/to/file.py:function', got {_short(m.factory)}")
        _check_path("model.factory", file, fail)
        if not _is_file(Path(file)):
            fail("model.factory", f"no such file {file!r}")
    cm = spec.comm
    if cm.bucket_mb <= 0 or cm.first_bucket_mb <= 0:
        fail("comm.bucket_mb", f"bucket sizes must be > 0, got {cm.bucket_mb} and {cm.first_bucket_mb}")
    if cm.stall_timeout_s < 0:
        fail("comm.stall_timeout_s", f"must be >= 0, got {cm.stall_timeout_s}")
    c = spec.checkpoint
    if c.every_steps < 0:
        fail("checkpoint.every_steps", f"must be >= 0, got {c.every_steps}")
    if c.every_seconds < 0:
        fail("checkpoint.every_seconds", f"must be >= 0, got {c.every_seconds}")
    if c.keep < 1:
        fail("checkpoint.keep", f"must be >= 1, got {c.keep}")
    s = spec.slurm
    _check_path("slurm.template", s.template, fail)
    if s.nodes < 1:
        fail("slurm.nodes", f"must be >= 1, got {s.nodes}")
    for key in ("tasks_per_node", "gpus_per_node"):
        if getattr(s, key) < 0:
            fail(f"slurm.{key}", f"must be >= 0, got {getattr(s, key)}")
    if s.cpus_per_task < 1:
        fail("slurm.cpus_per_task", f"must be >= 1, got {s.cpus_per_task}")
    if s.signal_lead_s < 0:
        fail("slurm.signal_lead_s", f"must be >= 0, got {s.signal_lead_s}")
    if s.max_requeues < -1:
        fail("slurm.max_requeues", f"must be >= 0, or -1 for the profile's, got {s.max_requeues}")


NAME_MAX, PATH_MAX = 255, 4095  # bytes in a file name and in a path (Linux; most file systems)
MAX_SECONDS = 1e9  # ~31 years: longer waits overflow the OS's timers (threading.TIMEOUT_MAX is ~9.2e9)
MAX_BUCKET_MB = 2**20  # 1 TiB; int(bucket_mb * 2**20) overflows for huge floats


def _check_path(key: str, value: str, fail) -> None:
    """A path the file system can hold: each name <= NAME_MAX bytes, the whole <= PATH_MAX bytes."""
    data = value.encode("utf-8")
    if len(data) > PATH_MAX:
        fail(key, f"{_short(value)} is {len(data)} bytes long; a path can be at most {PATH_MAX} bytes")
    for part in data.split(b"/"):
        if len(part) > NAME_MAX:
            fail(
                key,
                f"{_short(part.decode('utf-8', 'replace'))} is {len(part)} bytes long; a file name can be "
                f"at most {NAME_MAX} bytes",
            )


def _validate_ranges(spec: JobSpec, fail) -> None:
    """Ranges that hold whatever the strategy (a count is never negative, even in a section the job does
    not use), seeds numpy takes, durations and sizes the OS and the bucket planner take, model.args names."""
    p, ps, t, d, cm = spec.parallel, spec.ps, spec.train, spec.data, spec.comm
    for key in ("stages", "micro_batches", "data_replicas"):
        if getattr(p, key) < 1:
            fail(f"parallel.{key}", f"must be >= 1, got {getattr(p, key)}")
    if ps.servers < 1:
        fail("ps.servers", f"must be >= 1, got {ps.servers}")
    if ps.staleness < 0:
        fail("ps.staleness", f"must be >= 0, got {ps.staleness}")
    if ps.heartbeat_s <= 0:
        fail("ps.heartbeat_s", f"must be > 0, got {ps.heartbeat_s}")
    if ps.simulate_compute_s < 0:
        fail("ps.simulate_compute_s", f"must be >= 0, got {ps.simulate_compute_s}")
    if ps.timeout_s <= ps.heartbeat_s:
        fail("ps.timeout_s", f"must exceed ps.heartbeat_s ({ps.heartbeat_s}), got {ps.timeout_s}")
    if not 0 <= t.seed < 2**32:  # each rank seeds numpy with [seed, rank]
        fail("train.seed", f"must be in [0, {2**32 - 1}], got {t.seed}")
    if d.split_seed < 0:
        fail("data.split_seed", f"must be >= 0, got {d.split_seed}")
    seconds = {
        "comm.stall_timeout_s": cm.stall_timeout_s,
        "checkpoint.every_seconds": spec.checkpoint.every_seconds,
        "ps.heartbeat_s": ps.heartbeat_s,
        "ps.timeout_s": ps.timeout_s,
        "ps.simulate_compute_s": ps.simulate_compute_s,
    }
    for key, value in seconds.items():
        if value > MAX_SECONDS:
            fail(key, f"must be <= {MAX_SECONDS:g} seconds, got {value:g}")
    for key in ("bucket_mb", "first_bucket_mb"):
        if getattr(cm, key) > MAX_BUCKET_MB:
            fail(f"comm.{key}", f"must be <= {MAX_BUCKET_MB} (1 TiB), got {getattr(cm, key):g}")
    for name in spec.model.args:  # passed as make_model(**model.args)
        if not name.isidentifier():
            fail(f"model.args.{_key_name(name)}", "is not a Python name, so not a keyword argument")


MAX_PARAMETERS = 2**40  # 4 TiB of float32: more than any one rank holds
MAX_BLOCKS = 100_000  # Python builds (and every rank walks) one module per block


def _validate_model_size(m: ModelSection, fail) -> None:
    """A built-in model that no rank could build: a lower bound of its parameters (whatever the dataset's
    input and class counts) and its count of blocks, checked here rather than as a rank's failed allocation
    (or a build loop of hours) after the launch."""

    def pairs(widths: list[int]) -> int:
        return sum(a * b for a, b in zip(widths, widths[1:], strict=False))

    if m.name == "mlp":
        key, blocks, params = "model.hidden", len(m.hidden), pairs(m.hidden) + sum(m.hidden)
    elif m.name == "cnn":
        key, blocks, params = "model.channels", len(m.channels), 9 * (pairs(m.channels) + m.channels[0])
    elif m.name == "resnet":
        key = "model.blocks" if m.blocks > max(m.channels) else "model.channels"
        blocks = m.blocks * len(m.channels)
        params = sum((2 * m.blocks - 1) * 9 * w * w for w in m.channels)
    else:
        key = "model.layers" if m.layers > m.d_model else "model.d_model"
        blocks, params = m.layers, 12 * m.layers * m.d_model**2
    if blocks > MAX_BLOCKS:
        fail(key, f"the {m.name} would have {blocks} blocks; at most {MAX_BLOCKS} are built")
    if params > MAX_PARAMETERS:
        fail(
            key,
            f"the {m.name} would hold at least {params:.3g} parameters ({4 * params / 2**40:.3g} TiB of "
            f"float32); at most {MAX_PARAMETERS:.3g} (4 TiB) are built",
        )


def _validate_ps(spec: JobSpec, fail) -> None:
    """The [ps] section, and the batch split across the workers (not all ranks) of train.strategy = 'ps'."""
    p, j, t = spec.ps, spec.job, spec.train
    workers = j.ranks - p.servers
    if workers < 1:
        fail(
            "job.ranks",
            f"{j.ranks} ranks leave no worker beside ps.servers = {p.servers} (need >= servers + 1)",
        )
    if t.batch_size % workers:
        fail(
            "train.batch_size",
            f"global batch {t.batch_size} does not divide across {workers} workers "
            f"({j.ranks} ranks - {p.servers} servers)",
        )
    if t.device != "cpu":  # servers and workers keep parameters in host memory (no GPU path yet)
        fail("train.device", f"train.strategy = 'ps' runs on cpu only, got {t.device!r}")


def _validate_pipeline(spec: JobSpec, fail) -> None:
    """The layout (ranks = stages x data_replicas), the batch split, the cut points."""
    p, t, ranks = spec.parallel, spec.train, spec.job.ranks
    if ranks != p.stages * p.data_replicas:
        fail(
            "job.ranks",
            f"world size {ranks} != stages {p.stages} x data_replicas {p.data_replicas}",
        )
    if t.grad_accum != 1:
        fail("train.grad_accum", "must be 1 for the pipeline: parallel.micro_batches is its accumulation")
    if t.device != "cpu":  # stage-to-stage messages are host buffers; no GPU staging yet
        fail("train.device", f"train.strategy = 'pipeline' runs on cpu only, got {t.device!r}")
    if t.batch_size % (p.data_replicas * p.micro_batches):
        fail(
            "train.batch_size",
            f"global batch {t.batch_size} does not split into data_replicas {p.data_replicas} x "
            f"micro_batches {p.micro_batches}",
        )
    if isinstance(p.split, str):
        if p.split not in ("layers", "params"):
            fail("parallel.split", f"{p.split!r} is not one of 'layers', 'params', or a list of split points")
    else:
        if len(p.split) != p.stages - 1:
            fail("parallel.split", f"{p.stages} stages need {p.stages - 1} split points, got {p.split}")
        if any(b <= a for a, b in zip([0, *p.split], p.split, strict=False)):
            fail("parallel.split", f"split points must be increasing and > 0, got {p.split}")


# ---------------------------------------------------------------------------------------------- TOML out


# TOML basic strings must escape '"', '\\' and the control characters other than tab; everything else is
# written as itself (job.toml is UTF-8). json.dumps is not a TOML writer: it escapes characters beyond the
# BMP as surrogate pairs ("\\ud83d\\ude80"), which TOML rejects.
_TOML_ESCAPES = {i: f"\\u{i:04x}" for i in [*range(0x20), 0x7F]} | {
    ord('"'): '\\"',
    ord("\\"): "\\\\",
    ord("\b"): "\\b",
    ord("\t"): "\\t",
    ord("\n"): "\\n",
    ord("\f"): "\\f",
    ord("\r"): "\\r",
}


def toml_string(s: str) -> str:
    """``s`` as a TOML basic string that reads back as exactly ``s``, whatever Unicode it holds.

    Lone surrogates (how Python spells the bytes of a file name that are not UTF-8) are not Unicode
    characters and no TOML file can hold them: ValueError.
    """
    bad = _lone_surrogate(s)
    if bad is not None:
        raise ValueError(f"{s!r}: {bad}")
    return '"' + s.translate(_TOML_ESCAPES) + '"'


def _lone_surrogate(s: str) -> str | None:
    """Why ``s`` cannot be written as UTF-8 (TOML, JSON for the ranks), or None."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return "holds bytes that are not UTF-8 (an undecodable file name?), which a TOML file cannot store"
    return None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # nan, inf and -inf are TOML too
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dumps_toml(doc: dict[str, dict[str, Any]]) -> str:
    """Write a two-level document (sections of scalars, lists and inline tables) as TOML."""
    out = []
    for section, values in doc.items():
        out.append(f"[{section}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


def field_docs() -> dict[str, list[tuple[str, str, str]]]:
    """(key, default, doc) per section, for the README's job spec reference and `hpcai validate --explain`."""
    docs = {}
    for sec in _sections():
        cls = SECTION_TYPES[sec.name]
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f.name, _toml_value(default), f.metadata.get("doc", "")))
        docs[sec.name] = rows
    return docs
