"""Cluster profiles: what a Slurm cluster needs in every batch script, as typed, validated TOML.

A profile is ``cluster/NAME.toml`` (or any path); ``--cluster NAME`` looks in ``$HPCAI_CLUSTER_DIR``, then
``./cluster``, then the profiles shipped with hpcai (:mod:`hpcai.resources`)::

    hpcai render jobs/digits.toml --cluster local
    hpcai submit jobs/digits.toml --cluster path/to/site.toml --dry-run

Unknown keys, wrong types and impossible values raise :class:`~hpcai.errors.UserError` naming the file and
key, with the valid keys listed. A job spec's ``[slurm]`` section combines with the profile; the spec wins
where both set a value (see :func:`hpcai.slurm.resolve`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcai import resources
from hpcai.errors import UserError
from hpcai.spec import _doc, build_sections

# The source checkout (tests use it); shipped profiles and templates are found through hpcai.resources.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

LAUNCHERS = ("srun", "mpirun", "mpiexec")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?$")
# Values on #SBATCH lines are not seen by a shell but a newline would end the comment: one safe token each.
_SBATCH_TOKEN = re.compile(r"^[A-Za-z0-9_.,:+\-=@%&|*()\[\]/]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ProfileError(UserError):
    """A cluster profile that does not validate."""


@dataclass(frozen=True)
class ClusterSection:
    name: str = _doc("Profile name (shown by render/submit).", default="")
    partition: str = _doc("#SBATCH --partition; empty: the cluster's default partition.", default="")
    account: str = _doc("#SBATCH --account; empty: none.", default="")
    qos: str = _doc("#SBATCH --qos; empty: none.", default="")
    constraint: str = _doc("#SBATCH --constraint (node features, e.g. 'gpu&a100'); empty: none.", default="")
    cores_per_node: int = _doc("Cores per node: tasks_per_node x cpus_per_task must fit.", default=1)
    gpus_per_node: int = _doc("GPUs per node: a job's slurm.gpus_per_node must fit.", default=0)
    time: str = _doc("Default time limit (Slurm syntax) when the job spec sets none.", default="01:00:00")
    mem: str = _doc("Default memory per node (e.g. 8G); empty: the cluster's default.", default="")
    mem_per_cpu: str = _doc("Default memory per core; excludes mem and mem_per_gpu.", default="")
    mem_per_gpu: str = _doc("Default memory per GPU; excludes mem and mem_per_cpu.", default="")
    template: str = _doc("Template name (templates/NAME.sbatch.j2) or path; 'mpi' by default.", default="mpi")
    sbatch: list[str] = _doc(
        "Extra #SBATCH options, one per item, e.g. '--exclusive' or '--mail-type=END'.", default_factory=list
    )


@dataclass(frozen=True)
class EnvSection:
    modules: list[str] = _doc("Environment modules to `module load`, in order.", default_factory=list)
    vars: dict[str, str] = _doc(
        "Variables to export (values are quoted for the shell).", default_factory=dict
    )
    setup: list[str] = _doc(
        "Shell lines run before the launch, verbatim (trusted: this is the profile author's shell code).",
        default_factory=list,
    )


@dataclass(frozen=True)
class LaunchSection:
    launcher: str = _doc(
        "MPI launcher command: 'srun --mpi=pmix', 'srun --mpi=pmi2', 'mpirun' or 'mpiexec' (a path may "
        "replace the program name). mpirun/mpiexec get -n $SLURM_NTASKS.",
        default="srun --mpi=pmix",
    )


@dataclass(frozen=True)
class RequeueSection:
    signal_lead_s: int = _doc(
        "Seconds before the time limit that Slurm sends USR1 to the batch shell (#SBATCH --signal=B:USR1@N); "
        "Slurm checks about once a minute, so this is a lower bound.",
        default=120,
    )
    max_requeues: int = _doc(
        "Requeues after a checkpoint-and-exit (status 75) before the job gives up; 0 never requeues.",
        default=3,
    )


@dataclass(frozen=True)
class Profile:
    """A whole cluster profile: one attribute per TOML section."""

    cluster: ClusterSection = field(default_factory=ClusterSection)
    env: EnvSection = field(default_factory=EnvSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    requeue: RequeueSection = field(default_factory=RequeueSection)
    source: str = field(default="<defaults>", compare=False)

    @property
    def launcher_argv(self) -> list[str]:
        return shlex.split(self.launch.launcher)

    @property
    def launcher_kind(self) -> str:
        """'srun', 'mpirun' or 'mpiexec' (the launcher's program name without its directory)."""
        return Path(self.launcher_argv[0]).name


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Profile) if f.name != "source"}


def find_profile(name_or_path: str) -> Path:
    """``NAME`` -> $HPCAI_CLUSTER_DIR/NAME.toml, ./cluster/NAME.toml, else the shipped one (first found, see
    :mod:`hpcai.resources`); with / or .toml: a path."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        p = Path(name_or_path)
        if not resources.is_file(p):
            raise ProfileError(f"{name_or_path}: no such cluster profile file")
        return p
    found = resources.find("cluster", f"{name_or_path}.toml")
    if found is not None:
        return found
    shipped, yours = resources.names("cluster", ".toml")
    close = difflib.get_close_matches(name_or_path, shipped + yours, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    also = f"; yours: {', '.join(yours)}" if yours else ""
    raise ProfileError(
        f"--cluster {name_or_path}: no profile cluster/{name_or_path}.toml{hint}; "
        f"shipped: {', '.join(shipped)}{also}"
    )


def load_profile(name_or_path: str) -> Profile:
    """Read and validate a cluster profile by name or path."""
    path = find_profile(name_or_path)
    source = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{source}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{source}: not a text file") from None
    except OSError as e:
        raise ProfileError(f"{source}: cannot read: {e.strerror}") from None
    return parse_profile(raw, source)


def parse_profile(raw: dict[str, Any], source: str) -> Profile:
    types = {name: type(factory()) for name, factory in _SECTIONS.items()}
    sections = build_sections(raw, types, source, ProfileError)
    profile = Profile(**sections, source=source)
    validate_profile(profile)
    return profile


def check_time(value: str, where: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; 'UNLIMITED' is not allowed here."""
    m = _TIME.match(value)
    if not m:
        raise ProfileError(f"{where}: {value!r} is not a Slurm time (M, H:M:S, D-H:M:S)")
    days, a, b, c = m.groups()
    days = int(days or 0)
    if days and c is None and b is None:  # D-H
        return days * 86400 + int(a) * 3600
    if days and c is None:  # D-H:M
        return days * 86400 + int(a) * 3600 + int(b) * 60
    if c is not None:  # [D-]H:M:S
        return days * 86400 + int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


def check_mem(value: str, where: str) -> None:
    if not _MEM.match(value):
        raise ProfileError(f"{where}: {value!r} is not a Slurm memory size (e.g. 8000, 8G, 512M)")


def check_sbatch_token(value: str, where: str) -> None:
    if not _SBATCH_TOKEN.match(value):
        raise ProfileError(f"{where}: {value!r}: use letters, digits and _.,:+-=@%&|*()[]/ only (no spaces)")


def check_line(value: str, where: str) -> None:
    """One line of script: a newline, carriage return or NUL would start a line nobody wrote."""
    if any(c in value for c in "\n\r\0"):
        raise ProfileError(f"{where}: must be a single line, got {value!r}")


def validate_profile(p: Profile) -> None:
    src, c = p.source, p.cluster

    def where(key: str) -> str:
        return f"{src}: {key}"

    for key in ("name", "partition", "account", "qos", "constraint"):
        if getattr(c, key):
            check_sbatch_token(getattr(c, key), where(f"cluster.{key}"))
    if c.cores_per_node < 1:
        raise ProfileError(f"{where('cluster.cores_per_node')}: must be >= 1, got {c.cores_per_node}")
    if c.gpus_per_node < 0:
        raise ProfileError(f"{where('cluster.gpus_per_node')}: must be >= 0, got {c.gpus_per_node}")
    check_time(c.time, where("cluster.time"))
    mems = [k for k in ("mem", "mem_per_cpu", "mem_per_gpu") if getattr(c, k)]
    for k in mems:
        check_mem(getattr(c, k), where(f"cluster.{k}"))
    if len(mems) > 1:
        raise ProfileError(
            f"{where('cluster.' + mems[1])}: conflicts with cluster.{mems[0]}; set one of them"
        )
    check_line(c.template, where("cluster.template"))
    for i, opt in enumerate(c.sbatch):
        check_line(opt, where(f"cluster.sbatch[{i}]"))
        if not opt.startswith("-"):
            raise ProfileError(
                f"{where(f'cluster.sbatch[{i}]')}: expected an option like '--exclusive', got {opt!r}"
            )
    for i, m in enumerate(p.env.modules):
        check_line(m, where(f"env.modules[{i}]"))
    for k, v in p.env.vars.items():
        if not _ENV_NAME.match(k):
            raise ProfileError(f"{where('env.vars')}: {k!r} is not a variable name")
        if not isinstance(v, str):
            raise ProfileError(f"{where(f'env.vars.{k}')}: expected str, got {type(v).__name__} {v!r}")
        check_line(v, where(f"env.vars.{k}"))
    for i, line in enumerate(p.env.setup):
        check_line(line, where(f"env.setup[{i}]"))
    check_line(p.launch.launcher, where("launch.launcher"))
    try:
        argv = p.launcher_argv
    except ValueError as e:
        raise ProfileError(f"{where('launch.launcher')}: {e}") from None
    if not argv or Path(argv[0]).name not in LAUNCHERS:
        raise ProfileError(
            f"{where('launch.launcher')}: {p.launch.launcher!r} must start with one of {', '.join(LAUNCHERS)}"
        )
    if p.requeue.signal_lead_s < 0:
        raise ProfileError(f"{where('requeue.signal_lead_s')}: must be >= 0, got {p.requeue.signal_lead_s}")
    if p.requeue.max_requeues < 0:
        raise ProfileError(f"{where('requeue.max_requeues')}: must be >= 0, got {p.requeue.max_requeues}")
