"""Cluster profiles and spec+profile conflicts: every bad input is a UserError naming the file and key.

pytest tests/test_profiles.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpcai.errors import UserError
from hpcai.profiles import PROJECT_ROOT, check_time, load_profile
from hpcai.slurm import Context, render
from hpcai.spec import load_spec

CTX = Context(python="/opt/venv/bin/python", workdir="/home/user/project")


def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["local", "openmpi-cpu", "gpu-example"])
def test_shipped_profiles_load(name):
    p = load_profile(name)
    assert p.cluster.name == name
    assert p.launcher_kind in ("srun", "mpirun", "mpiexec")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[clustr]\n", r"site.toml: unknown section \[clustr\] \(did you mean 'cluster'\?\)"),
        (
            "[cluster]\npartion = 'x'\n",
            r"site.toml: cluster.partion: unknown key \(did you mean 'partition'\?\); valid",
        ),
        ("[cluster]\ncores_per_node = '4'\n", r"site.toml: cluster.cores_per_node: expected int"),
        ("[cluster]\ntime = 'one hour'\n", r"site.toml: cluster.time: 'one hour' is not a Slurm time"),
        (
            "[cluster]\nmem = '8G'\nmem_per_cpu = '1G'\n",
            r"site.toml: cluster.mem_per_cpu: conflicts with cluster.mem",
        ),
        ("[cluster]\nmem = 'lots'\n", r"site.toml: cluster.mem: 'lots' is not a Slurm memory size"),
        ("[cluster]\npartition = 'a b'\n", r"site.toml: cluster.partition: 'a b'"),
        (
            '[cluster]\nsbatch = ["--x\\nrm -rf ~"]\n',
            r"site.toml: cluster.sbatch\[0\]: must be a single line",
        ),
        ("[cluster]\nsbatch = ['exclusive']\n", r"site.toml: cluster.sbatch\[0\]: expected an option"),
        ('[env]\nsetup = ["a\\nb"]\n', r"site.toml: env.setup\[0\]: must be a single line"),
        ("[env]\nvars = { 'A-B' = 'x' }\n", r"site.toml: env.vars: 'A-B' is not a variable name"),
        ("[env]\nvars = { A = 1 }\n", r"site.toml: env.vars.A: expected str"),
        (
            "[launch]\nlauncher = 'aprun -n 4'\n",
            r"site.toml: launch.launcher: 'aprun -n 4' must start with one of",
        ),
        ("[launch]\nlauncher = 'srun \"--mpi'\n", r"site.toml: launch.launcher: No closing quotation"),
        ("[requeue]\nmax_requeues = -2\n", r"site.toml: requeue.max_requeues: must be >= 0"),
        ("[cluster\n", r"site.toml: not valid TOML"),
    ],
)
def test_bad_profiles_name_file_and_key(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_profile(str(_profile(tmp_path, text)))


def test_unknown_profile_name_suggests_shipped():
    with pytest.raises(
        UserError, match=r"--cluster lokal: .*did you mean 'local'.*shipped: gpu-example, local"
    ):
        load_profile("lokal")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 1800),
        ("30:15", 1815),
        ("01:00:00", 3600),
        ("2-0", 172800),
        ("1-02:03", 93780),
        ("1-0:0:5", 86405),
    ],
)
def test_slurm_time_formats(value, seconds):
    assert check_time(value, "k") == seconds


# ------------------------------------------------------------------------------------------ spec + profile


def _render(
    sets: list[str], profile_text: str | None = None, tmp_path: Path | None = None, ranks=None
) -> str:
    spec = load_spec(str(PROJECT_ROOT / "jobs" / "digits.toml"), sets, ranks=ranks)
    profile = load_profile(str(_profile(tmp_path, profile_text))) if profile_text else load_profile("local")
    return render(spec, profile, context=CTX)


def test_spec_wins_over_profile(tmp_path):
    text = _render(
        ["slurm.time='00:05:00'", "slurm.mem='1G'", "slurm.signal_lead_s=30", "slurm.max_requeues=7"],
        "[cluster]\ncores_per_node = 8\ntime = '02:00:00'\nmem_per_cpu = '2G'\n",
        tmp_path,
    )
    assert "#SBATCH --time=00:05:00\n" in text
    assert (
        "#SBATCH --mem=1G\n" in text and "mem-per-cpu" not in text
    )  # the spec's memory key replaces the profile's
    assert "#SBATCH --signal=B:USR1@30\n" in text
    assert "cap of 7" in text


def test_profile_fills_what_the_spec_leaves_empty(tmp_path):
    text = _render([], "[cluster]\ncores_per_node = 8\ntime = '02:00:00'\nmem_per_cpu = '2G'\n", tmp_path)
    assert "#SBATCH --time=02:00:00\n" in text and "#SBATCH --mem-per-cpu=2G\n" in text


@pytest.mark.parametrize(
    ("sets", "ranks", "message"),
    [
        (
            ["slurm.mem='8G'", "slurm.mem_per_cpu='1G'"],
            None,
            r"digits.toml: slurm.mem_per_cpu: conflicts with slurm.mem",
        ),
        (["slurm.mem_per_gpu='8G'"], None, r"digits.toml: slurm.mem_per_gpu: memory per GPU without GPUs"),
        (["slurm.time='soon'"], None, r"digits.toml: slurm.time: 'soon' is not a Slurm time"),
        (["slurm.time='1'", "slurm.signal_lead_s=90"], None, r"digits.toml: slurm.signal_lead_s: 90 s lead"),
        (
            ["slurm.nodes=2", "train.batch_size=63"],
            3,
            r"digits.toml: slurm.nodes: job.ranks 3 does not divide across 2 nodes",
        ),
        (
            ["slurm.tasks_per_node=3"],
            2,
            r"digits.toml: slurm.tasks_per_node: 3 per node x 1 nodes != job.ranks 2",
        ),
        (["slurm.cpus_per_task=2"], 2, r"digits.toml: slurm.cpus_per_task: .* = 4 cores > 2 per node"),
        (["slurm.gpus_per_node=1"], None, r"digits.toml: slurm.gpus_per_node: 1 > 0 GPUs per node"),
        (["slurm.template='nosuch'"], None, r"--template nosuch: no template"),
        (["slurm.max_requeues=-3"], None, r"digits.toml: slurm.max_requeues: must be >= 0"),
    ],
)
def test_conflicts_name_file_and_key(sets, ranks, message):
    with pytest.raises(UserError, match=message):
        _render(sets, ranks=ranks)


def test_extra_sbatch_line_may_not_repeat_a_generated_option(tmp_path):
    with pytest.raises(UserError, match=r"site.toml: cluster.sbatch\[1\]: --time is set by hpcai"):
        _render([], "[cluster]\ncores_per_node = 8\nsbatch = ['--exclusive', '--time=5']\n", tmp_path)


def test_cli_reports_one_line_and_exit_2(tmp_path):
    path = _profile(tmp_path, "[cluster]\npartion = 'x'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "hpcai", "render", "jobs/digits.toml", "--cluster", str(path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"hpcai: error: {path}: cluster.partion: unknown key")
