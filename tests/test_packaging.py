"""A wheel is a complete install: every subpackage, the sbatch templates, the cluster profiles and the example
jobs travel in it, and an installed hpcai run from an empty directory finds them. User files still win.

Also: scripts/slurm-local.sh counts the machine's CPUs, not the caller's OpenMP thread setting.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hpcai import resources
from hpcai.errors import UserError
from hpcai.profiles import find_profile, load_profile
from hpcai.slurm import find_template

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"templates": "*.j2", "cluster": "*.toml", "jobs": "*.toml"}
BUILD_FILES = ("setup.cfg", "pyproject.toml", "setup.py", "README.md", "MANIFEST.in")


def _copy_source(dst: Path) -> Path:
    """The files a build reads, copied out: the build writes build/ and *.egg-info beside its sources, and
    other test runs may be building from the checkout at the same time."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*")
    for name in ("hpcai", *SHARED):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for name in BUILD_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not any(importlib.util.find_spec(m) for m in ("setuptools.command.bdist_wheel", "wheel")):
        pytest.skip("no wheel builder here: setuptools >= 70.1 (torch installs it) or the wheel package")
    src = _copy_source(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    p = subprocess.run([*cmd, "."], cwd=src, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    (whl,) = out.glob("hpcai-*.whl")
    return whl


def test_wheel_holds_every_module_and_the_shipped_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "hpcai").rglob("*.py")}
    assert "hpcai/data/__init__.py" in names and "hpcai/data/etl.py" in names
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    for kind, pattern in SHARED.items():
        shipped = {f"hpcai/_share/{kind}/{p.name}" for p in (ROOT / kind).glob(pattern)}
        assert shipped, kind
        assert not shipped - names, f"{kind} missing from the wheel: {sorted(shipped - names)}"


def test_installed_wheel_works_from_an_empty_directory(wheel, tmp_path):
    """The wheel alone (no checkout on the path) validates the embedded default job and renders a script
    with the shipped local profile and mpi template. Training from the wheel runs in .ci/run."""
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target)]
    p = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "HPCAI_TTY": "0"}
    env.pop("HPCAI_CLUSTER_DIR", None)

    def hpcai(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "hpcai", *args]
        return subprocess.run(cmd, cwd=empty, env=env, capture_output=True, text=True, timeout=120)

    code = "import hpcai.resources as r; print(r.__file__); print(r.shipped_dir('cluster'))"
    where = subprocess.run(
        [sys.executable, "-c", code], cwd=empty, env=env, capture_output=True, text=True, timeout=60
    )
    assert where.returncode == 0, where.stderr
    module, cluster = where.stdout.split("\n")[:2]
    assert Path(module).is_relative_to(target) and Path(cluster) == target / "hpcai" / "_share" / "cluster"
    v = hpcai("validate")
    assert v.returncode == 0, v.stdout + v.stderr
    r = hpcai("render", "--cluster", "local")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "#SBATCH --ntasks=2" in r.stdout and str(target / "hpcai" / "_share" / "cluster") in r.stdout
    assert sorted(os.listdir(empty)) == []  # render writes nothing


# ------------------------------------------------------------------------------------------ lookup order


@pytest.fixture
def in_empty_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(resources.CLUSTER_DIR_ENV, raising=False)
    return tmp_path


def _profile(path: Path, cores: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[cluster]\ncores_per_node = {cores}\n")
    return path


def test_shipped_files_are_found_without_a_checkout_directory(in_empty_dir):
    assert find_profile("local") == resources.shipped_dir("cluster") / "local.toml"
    assert find_template("mpi") == resources.shipped_dir("templates") / "mpi.sbatch.j2"
    assert resources.example_job("digits") == resources.shipped_dir("jobs") / "digits.toml"


def test_working_directory_wins_over_shipped_and_cluster_dir_wins_over_both(in_empty_dir, monkeypatch):
    _profile(in_empty_dir / "cluster" / "local.toml", 3)
    assert load_profile("local").cluster.cores_per_node == 3
    site = in_empty_dir / "site"
    _profile(site / "local.toml", 5)
    monkeypatch.setenv(resources.CLUSTER_DIR_ENV, str(site))
    assert load_profile("local").cluster.cores_per_node == 5
    # A name the site directory lacks falls through to ./cluster, then to the shipped profiles.
    _profile(in_empty_dir / "cluster" / "mine.toml", 7)
    assert load_profile("mine").cluster.cores_per_node == 7
    assert find_profile("openmpi-cpu") == resources.shipped_dir("cluster") / "openmpi-cpu.toml"
    # Several directories, like PATH: the first that has the name wins.
    other = in_empty_dir / "other"
    _profile(other / "local.toml", 9)
    monkeypatch.setenv(resources.CLUSTER_DIR_ENV, os.pathsep.join([str(other), str(site)]))
    assert load_profile("local").cluster.cores_per_node == 9


def test_working_directory_template_wins(in_empty_dir):
    mine = in_empty_dir / "templates" / "mpi.sbatch.j2"
    mine.parent.mkdir()
    mine.write_text("#!/bin/bash\n# mine\n")
    assert find_template("mpi").resolve() == mine


def test_cluster_dir_that_is_not_a_directory_is_one_clear_error(in_empty_dir, monkeypatch):
    monkeypatch.setenv(resources.CLUSTER_DIR_ENV, str(in_empty_dir / "nowhere"))
    with pytest.raises(UserError, match=r"HPCAI_CLUSTER_DIR: .*nowhere: no such directory"):
        find_profile("local")


def test_unknown_profile_lists_the_shipped_and_the_users(in_empty_dir):
    _profile(in_empty_dir / "cluster" / "mysite.toml", 2)
    with pytest.raises(UserError, match=r"no profile cluster/lokal.toml \(did you mean 'local'\?\).*mysite"):
        find_profile("lokal")


# ------------------------------------------------------------------------------------------ slurm-local.sh


@pytest.mark.parametrize("command", ["cpus", "conf"])
def test_slurm_local_counts_the_machines_cpus_not_omp_threads(command):
    """With OMP_NUM_THREADS=1 exported (login nodes do), `nproc` says 1: Slurm then had CPUs=1 and every
    2-rank job pended forever."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_THREAD_LIMIT": "1"}
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm-local.sh"), command],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    cpus = len(os.sched_getaffinity(0))
    if command == "cpus":
        assert p.stdout == f"{cpus}\n"
    else:
        assert f" CPUs={cpus} " in p.stdout and "NodeName=" in p.stdout
