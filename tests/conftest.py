"""Shared fixtures: a digits dataset built once per session, and helpers to run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What every run's summary.json must hold (the main job issue's contract).
SUMMARY_KEYS = {
    "world_size",
    "steps",
    "epochs",
    "final_loss",
    "test_accuracy",
    "wall_s",
    "samples_per_s",
    "dataset",
}


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # 2-core CI box: ranks oversubscribe, one thread each
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HPCAI_TTY"] = "0"
    for key in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_ID"):
        env.pop(key, None)  # tests start their own MPI worlds
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 180, **env: str
) -> subprocess.CompletedProcess:
    """``python -m hpcai ARGS`` in a subprocess, output captured, under a timeout (never hang)."""
    return subprocess.run(
        [sys.executable, "-m", "hpcai", *args],
        cwd=cwd or ROOT,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hpcai.data.etl import build_dataset

    out = tmp_path_factory.mktemp("data") / "digits"
    build_dataset("digits", out, shards=4, log=lambda *_: None)
    return out


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "64k") mounted at ``where``: a full disk on demand. Mounting needs root, as
    here and in CI; elsewhere the test is skipped. Always unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a small tmpfs: {e}")
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill_disk(directory: Path) -> None:
    """Write ``directory/filler`` until the file system is full (unbuffered: nothing left to flush)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
