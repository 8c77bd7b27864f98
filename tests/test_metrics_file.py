"""metrics.jsonl: a torn last line never blocks a resume, a garbled one is named, a full disk is one line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from hpcai.errors import UserError
from hpcai.fsio import NoSpaceError
from hpcai.report import Reporter, rank_logger, read_metrics, truncate_metrics
from tests.conftest import fill_disk, run_cli, small_tmpfs


def _records(n: int) -> list[dict]:
    return [{"step": 10 * i, "epoch": 0, "loss": 1.0 / i, "lr": 0.1} for i in range(1, n + 1)]


def _write(run_dir: Path, lines: list[str], tail: str = "") -> Path:
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(line + "\n" for line in lines) + tail)
    return path


def test_torn_last_line_is_dropped_with_a_warning(tmp_path: Path) -> None:
    """A record cut off by a full disk or a kill (no newline, half a JSON object) is the file's last line."""
    lines = [json.dumps(r) for r in _records(3)]
    path = _write(tmp_path, lines, tail='{"step": 40, "epoch": 0, "lo')
    warnings: list[str] = []
    truncate_metrics(tmp_path, 20, warnings.append)
    assert path.read_text() == "".join(line + "\n" for line in lines[:2])
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0] and "line 4" in warnings[0]
    # Nothing to drop: the file is left as it is, no warning.
    truncate_metrics(tmp_path, 20, warnings.append)
    assert path.read_text() == "".join(line + "\n" for line in lines[:2]) and len(warnings) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize(
    "bad", ['{"step": 20, "lo', "not json at all", '{"epoch": 0}', "[1, 2]", '{"step": "ten"}']
)
def test_garbled_line_elsewhere_is_reported_with_its_number(tmp_path: Path, bad: str) -> None:
    lines = [json.dumps(r) for r in _records(3)]
    path = _write(tmp_path, [lines[0], bad, *lines[1:]])
    before = path.read_bytes()
    with pytest.raises(UserError) as err:
        truncate_metrics(tmp_path, 100, lambda _msg: None)
    assert f"{path}: line 2:" in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == before  # nothing rewritten


def test_read_metrics_skips_blank_lines(tmp_path: Path) -> None:
    recs = _records(2)
    _write(tmp_path, [json.dumps(recs[0]), "", json.dumps(recs[1])])
    assert read_metrics(tmp_path / "metrics.jsonl") == recs


# ------------------------------------------------------------------------------------ full disk


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 64 KiB tmpfs."""
    with small_tmpfs(tmp_path / "tiny", "64k") as mnt:
        yield mnt


def test_full_disk_while_writing_metrics_is_one_error(tiny_fs: Path, capfd: pytest.CaptureFixture) -> None:
    """Rank 0's log and metrics.jsonl on a file system that fills up: the metrics write raises one
    NoSpaceError naming metrics.jsonl, the log stops quietly (no logging traceback per record), and
    metrics.jsonl keeps only whole records (the record that did not fit is not left half written)."""
    run_dir = tiny_fs / "run"
    run_dir.mkdir()
    logger = rank_logger(run_dir, 0)
    reporter = Reporter(run_dir, True, logger, 1000, time.time())
    record = {"step": 0, "epoch": 0, "loss": 1.0, "lr": 0.1, "samples_per_s": 1.0, "wall_s": 0.0}
    reporter.step(dict(record, step=1), advance=1)
    fill_disk(tiny_fs)
    written = 1
    with pytest.raises(NoSpaceError) as err:
        for step in range(2, 2000):  # records fill metrics.jsonl's last page, then need a new one
            reporter.step(dict(record, step=step, note="x" * 200), advance=1)
            written += 1
    reporter.close()
    logging.getLogger("hpcai.rank0").info("after the failure")  # still quiet
    (handler,) = logger.handlers
    assert isinstance(handler.error, OSError)  # the log did run into the full disk, quietly
    handler.close()
    out, errtext = capfd.readouterr()
    assert str(err.value) == f"{run_dir / 'metrics.jsonl'}: no space left on device"
    assert "Logging error" not in errtext and "Traceback" not in errtext, errtext
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", warn=pytest.fail)]
    assert steps == list(range(1, written + 1))
    assert (run_dir / "metrics.jsonl").read_bytes().endswith(b"\n")


# ------------------------------------------------------------------------------------ end to end


def test_rerun_after_a_torn_metrics_line_resumes(tmp_path: Path, digits_dataset: Path) -> None:
    """The issue's case on the parameter server's path: a torn last line made every rerun fail with
    JSONDecodeError; now the rerun warns, drops it and finishes. The first run also drops one NaN worker
    step (train.on_nonfinite = "skip"): the synchronous round goes on without it, and the count survives
    the resume."""
    run_dir = tmp_path / "run"
    args = ["run", "jobs/digits_ps.toml", "-n", "2", "--run-dir", str(run_dir),
            "--set", f'data.path="{digits_dataset}"', "--set", "train.steps=6", "--set", "train.log_every=2",
            "--set", "train.on_nonfinite=skip", "--set", "ps.mode=bsp",
            "--inject-failure", "step=2,rank=1,how=nan"]  # fmt: skip
    first = run_cli(*args, timeout=150)
    assert first.returncode == 0, first.stderr
    assert "step 2 of worker rank 1: loss is nan: update dropped" in first.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6 and summary["updates"] == 5
    metrics = run_dir / "metrics.jsonl"
    whole = metrics.read_text()
    with open(metrics, "a") as f:
        f.write('{"step": 8, "epoch": 0, "lo')
    again = run_cli(*args, timeout=150)
    assert again.returncode == 0, again.stderr
    assert "metrics.jsonl: line 4 is cut off" in again.stdout + again.stderr
    assert metrics.read_text() == whole
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == 1
