"""Batch script rendering: golden files, shell quoting, and the script's requeue logic run under bash with
stand-in srun/scontrol (no Slurm needed; a few seconds).

    pytest tests/test_slurm_render.py
    HPCAI_UPDATE_GOLDEN=1 pytest tests/test_slurm_render.py    # rewrite tests/golden/*.sbatch, then review
                                                              # the diff with `git diff tests/golden`
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hpcai.errors import UserError
from hpcai.profiles import PROJECT_ROOT, load_profile
from hpcai.slurm import Context, render, shell_word_with_index
from hpcai.spec import load_spec

GOLDEN = Path(__file__).parent / "golden"
# Fixed machine-dependent values: goldens are the same on every machine.
CTX = Context(python="/opt/venv/bin/python", workdir="/home/user/project")
HOSTILE = "x; rm -rf ~ $(touch PWNED) `touch PWNED2` 'q'"

CASES = {
    "local": ("local", [], None, None),
    "openmpi-cpu": ("openmpi-cpu", ["slurm.nodes=2", "slurm.cpus_per_task=4"], 16, None),
    "gpu-example": (
        "gpu-example",
        ["slurm.nodes=2", "slurm.gpus_per_node=4", "slurm.time='00:20:00'"],
        8,
        None,
    ),
    "array-local": ("local", ["train.epochs=3"], None, "0-3%2"),
}


@pytest.fixture(autouse=True)
def _at_project_root(monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)  # profile and spec paths in the script header are then relative


def _render(profile: str, sets: list[str], ranks: int | None, array: str | None) -> str:
    spec = load_spec("jobs/digits.toml", sets, ranks=ranks)
    return render(spec, load_profile(profile), "array" if array else None, context=CTX, array=array)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    text = _render(*CASES[name])
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("HPCAI_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run HPCAI_UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(), (
        f"{path} differs: HPCAI_UPDATE_GOLDEN=1 pytest {__file__}, review git diff"
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_scripts_parse_in_bash(name, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(_render(*CASES[name]))
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr


def _unquoted(line: str) -> str:
    """The parts of a shell line outside '...' (what the shell would still interpret)."""
    return re.sub(r"'[^']*'", "''", line)


def test_hostile_job_name_and_run_dir_stay_inert(tmp_path):
    spec = load_spec(
        None, [f"job.name = {_toml(HOSTILE)}", f"job.run_dir = {_toml(str(tmp_path / HOSTILE))}"]
    )
    py, env = _fakes(tmp_path)
    hostile_py = tmp_path / "bin" / "py thon$(touch PWNED3)"
    py.rename(hostile_py)
    ctx = Context(python=str(hostile_py), workdir=str(tmp_path))
    text = render(spec, load_profile("local"), context=ctx)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    # Run it: the stand-in srun and "python" record the argv they got; nothing may be executed on the way.
    proc = subprocess.run(
        ["bash", str(script)], env={**env, "FAKE_STATUS": "0"}, capture_output=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert shlex.split(calls[1]) == ["py:", "-m", "hpcai", "run", str(tmp_path / HOSTILE / "job.toml")]
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        rest = _unquoted(line)
        for bad in ("rm -rf", "touch PWNED", "`"):
            assert bad not in rest, f"unquoted {bad!r} in: {line}"
    # On #SBATCH lines the value is double-quoted for sbatch's own parser; no shell reads those lines.
    assert f'#SBATCH --job-name="{HOSTILE}"' in text
    assert f'#SBATCH --output="{tmp_path / HOSTILE}/slurm-%j.out"' in text


def _toml(s: str) -> str:
    import json

    return json.dumps(s)


def test_both_quote_kinds_cannot_reach_an_sbatch_line():
    name = _toml(HOSTILE + ' "d"')
    spec = load_spec(None, [f"job.name = {name}"])
    with pytest.raises(UserError, match="job.name: .*both ' and"):
        render(spec, load_profile("local"), context=CTX)


def test_newline_cannot_reach_an_sbatch_line():
    run_dir = _toml("/tmp/a\n/bin/echo pwned")
    spec = load_spec(None, [f"job.run_dir = {run_dir}"])
    with pytest.raises(UserError, match="job.run_dir: .*control characters"):
        render(spec, load_profile("local"), context=CTX)


def test_array_index_substitution_is_quoted():
    assert shell_word_with_index("--set=lr.{index}") == '--set=lr."${SLURM_ARRAY_TASK_ID}"'
    assert shell_word_with_index("{index}") == '"${SLURM_ARRAY_TASK_ID}"'
    assert shell_word_with_index("$(x){index};y") == "'$(x)'\"${SLURM_ARRAY_TASK_ID}\"';y'"


def test_array_template_needs_a_range():
    spec = load_spec("jobs/digits.toml")
    with pytest.raises(UserError, match="--array: required"):
        render(spec, load_profile("local"), "array", context=CTX)


# ---------------------------------------------------------------------------------------------- requeue logic
# The rendered script runs under bash with stand-ins: `srun` execs its command, `scontrol` logs its arguments,
# and "python" is a shell script that plays a training job (exit 75 on USR1, or a given status).

FAKE_PY = """#!/bin/bash
trap 'echo "py: USR1" >> "$FAKE_LOG"; exit 75' USR1
echo "py: $(printf '%q ' "$@")" >> "$FAKE_LOG"  # %q: the exact argv, re-readable by shlex
touch "$FAKE_READY"
[ -n "${FAKE_STATUS:-}" ] && exit "$FAKE_STATUS"
for i in $(seq 300); do sleep 0.1; done
exit 0
"""


def _fakes(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun: $1" >> "$FAKE_LOG"\nshift\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol: $*" >> "$FAKE_LOG"\n')
    py = bin_dir / "python"
    py.write_text(FAKE_PY)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "FAKE_READY": str(tmp_path / "ready"),
        "SLURM_JOB_ID": "42",
        "HOME": str(tmp_path),
    }
    return py, env


def _run_script(tmp_path, *, array: str | None = None, signal_it: bool, **env_extra) -> tuple[int, str, str]:
    py, env = _fakes(tmp_path)
    env.update(env_extra)
    spec = load_spec("jobs/digits.toml", [f"job.run_dir = {_toml(str(tmp_path / 'run'))}"])
    ctx = Context(python=str(py), workdir=str(tmp_path))
    script = tmp_path / "job.sbatch"
    script.write_text(
        render(spec, load_profile("local"), "array" if array else None, context=ctx, array=array)
    )
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if signal_it:
            deadline = time.monotonic() + 20
            while not (tmp_path / "ready").exists():
                assert time.monotonic() < deadline, "stand-in training never started"
                time.sleep(0.05)
            proc.send_signal(signal.SIGUSR1)  # what `scancel --signal=USR1 --batch` does
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, out.decode(), (tmp_path / "calls.log").read_text()


def test_usr1_is_forwarded_and_exit_75_requeues(tmp_path):
    rc, out, calls = _run_script(tmp_path, signal_it=True, SLURM_RESTART_COUNT="1")
    assert rc == 0, out
    assert "SLURM_RESTART_COUNT=1" in out
    assert "py: USR1" in calls
    assert "scontrol: requeue 42" in calls
    assert calls.splitlines()[0] == "srun: --mpi=pmi2"
    assert shlex.split(calls.splitlines()[1]) == [
        "py:",
        "-m",
        "hpcai",
        "run",
        str(tmp_path / "run" / "job.toml"),
    ]


def test_requeue_cap_stops_requeueing(tmp_path):
    rc, out, calls = _run_script(tmp_path, signal_it=True, SLURM_RESTART_COUNT="3")  # local.toml: cap 3
    assert rc == 75
    assert "reached the cap of 3" in out
    assert "scontrol" not in calls


def test_crash_is_not_requeued(tmp_path):
    rc, out, calls = _run_script(tmp_path, signal_it=False, FAKE_STATUS="1")
    assert rc == 1
    assert "launcher exited with status 1" in out
    assert "scontrol" not in calls


def test_array_task_requeues_its_own_id(tmp_path):
    rc, out, calls = _run_script(
        tmp_path, array="0-3", signal_it=True, SLURM_ARRAY_JOB_ID="40", SLURM_ARRAY_TASK_ID="2"
    )
    assert rc == 0, out
    assert "scontrol: requeue 40_2" in calls
    assert f"--run-dir {tmp_path / 'run'}/task-2" in calls
