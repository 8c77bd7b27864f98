"""Where hpcai finds the files it ships: sbatch templates, cluster profiles and example job specs.

In the repository they are the top-level ``templates/``, ``cluster/`` and ``jobs/`` directories (their source
of truth). A wheel carries copies as package data, ``hpcai/_share/{templates,cluster,jobs}`` (setup.py's
build_py hook), so a site-packages or container install needs no checkout. An editable install or a source
tree has no copy and uses the top-level directories beside the package.

A user's files win over shipped ones, searched in this order (:func:`search_dirs`):

1. for cluster profiles, the directories in ``$HPCAI_CLUSTER_DIR`` (``:``-separated, like ``PATH``): a site
   can keep its profiles in one place for everyone;
2. ``./cluster`` or ``./templates`` in the working directory;
3. the shipped files.

A path given instead of a name (``--cluster path/site.toml``, ``--template path/x.sbatch.j2``) is used as is.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from hpcai.errors import UserError

KINDS = ("templates", "cluster", "jobs")
CLUSTER_DIR_ENV = "HPCAI_CLUSTER_DIR"


def shipped_dir(kind: str) -> Path:
    """The directory of shipped ``kind`` files (one of :data:`KINDS`): the wheel's package data, else the
    source checkout's top-level directory (editable installs)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    package = Path(str(importlib.resources.files("hpcai")))
    packaged = package / "_share" / kind
    if packaged.is_dir():
        return packaged
    # Resolved: a strict editable install links the checkout's files into a tree of its own.
    checkout = Path(__file__).resolve().parent.parent
    # pyproject.toml marks a source tree: never pick up a stray site-packages/templates of another package.
    if (checkout / "pyproject.toml").is_file() and (checkout / kind).is_dir():
        return checkout / kind
    raise UserError(
        f"{package}: this hpcai installation has no shipped {kind}/ (expected {packaged}); "
        "reinstall hpcai from a wheel built by its setup.py"
    )


def cluster_dirs_from_env() -> list[Path]:
    """The directories named by ``$HPCAI_CLUSTER_DIR``; one that does not exist is an error, not a silent
    fall-through to another profile of the same name."""
    value = os.environ.get(CLUSTER_DIR_ENV, "")
    dirs = [Path(part) for part in value.split(os.pathsep) if part]
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{CLUSTER_DIR_ENV}: {d}: no such directory")
    return dirs


def search_dirs(kind: str) -> list[Path]:
    """Where a ``kind`` file given by name is looked for, first match wins (see the module docstring)."""
    user = [Path(kind)]  # relative: a script's header then names ./cluster/x.toml as cluster/x.toml
    if kind == "cluster":
        user = [*cluster_dirs_from_env(), *user]
    return [*user, shipped_dir(kind)]


def find(kind: str, filename: str) -> Path | None:
    """The first ``DIR/filename`` of :func:`search_dirs` that is a file, or None."""
    for d in search_dirs(kind):
        if is_file(d / filename):
            return d / filename
    return None


def is_file(p: Path) -> bool:
    """``Path.is_file`` that says no (instead of raising) for names the OS refuses (too long, ...)."""
    try:
        return p.is_file()
    except OSError:
        return False


def names(kind: str, suffix: str) -> tuple[list[str], list[str]]:
    """The names with ``suffix`` that can be given, for error messages: (shipped, the user's others)."""
    *user, shipped_path = search_dirs(kind)

    def stems(d: Path) -> set[str]:
        return {p.name.removesuffix(suffix) for p in d.glob(f"*{suffix}")} if d.is_dir() else set()

    shipped = stems(shipped_path)
    return sorted(shipped), sorted(set().union(*map(stems, user)) - shipped)


def example_job(name: str) -> Path:
    """A shipped example job spec, e.g. ``example_job("digits")`` -> .../jobs/digits.toml."""
    path = shipped_dir("jobs") / f"{name}.toml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in shipped_dir("jobs").glob("*.toml")))
        raise UserError(f"{name}: no shipped example job {path.name}; shipped: {shipped}")
    return path
