"""What a run leaves and shows: per-rank logs, rank 0's progress, metrics.jsonl, summary.json, the plot.

Only rank 0 writes the shared files and the terminal; every rank writes ``logs/rank-<r>.log``.

A full disk is one line naming the file (:class:`hpcai.fsio.NoSpaceError`): metrics.jsonl is appended a
whole record per write (a record that does not fit is cut back off), a rank's log stops quietly at its first
failed write instead of printing logging's traceback for every record after it. A metrics.jsonl whose last
line was torn anyway (a kill, an older version) is read without it, with a warning.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcai import fsio
from hpcai.errors import UserError

METRICS = "metrics.jsonl"


class QuietFileHandler(logging.FileHandler):
    """A rank's log file that stops at its first failed write (a full disk, a lost mount).

    logging's own handler prints a traceback to stderr for every record it fails to write: on a full disk
    that buried the job's one real error line. This one keeps the first error in :attr:`error` and drops
    the records after it; what fails the job (metrics.jsonl, a checkpoint) says why, once."""

    def __init__(self, filename: Path):
        super().__init__(filename)
        self.error: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.error is None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self._fail(sys.exc_info()[1])

    def flush(self) -> None:
        try:
            super().flush()
        except (OSError, ValueError) as e:
            self._fail(e)

    def close(self) -> None:
        try:
            super().close()
        except (OSError, ValueError) as e:
            self._fail(e)

    def _fail(self, e: BaseException | None) -> None:
        """Keep the first error; let the stream go (its unwritten buffer could only fail again)."""
        if self.error is None:
            self.error = e
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except (OSError, ValueError):
                pass


def rank_logger(run_dir: Path, rank: int) -> logging.Logger:
    """A logger writing to ``RUN_DIR/logs/rank-<rank>.log`` (appending: a resumed run continues the file).

    A failed write (a full disk) is kept in the handler's ``error``, not printed (:class:`QuietFileHandler`).
    """
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"hpcai.rank{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        try:
            h.close()
        except (OSError, ValueError):  # an earlier run's handler on a file system that filled up
            pass
    handler = QuietFileHandler(log_dir / f"rank-{rank}.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return logger


class MetricsFile:
    """metrics.jsonl opened for appending, one whole record per write.

    A record that does not fit (a full disk) is cut back off the file and raises :class:`fsio.NoSpaceError`
    naming the file: the file keeps whole lines only, and the run fails with one line instead of a
    traceback. Unbuffered, so closing it cannot fail on data still to be written.
    """

    def __init__(self, path: Path):
        self.path = path
        flags = (
            os.O_WRONLY
            | os.O_APPEND
            | os.O_CREAT
            | getattr(os, "O_NOFOLLOW", 0)
            | getattr(os, "O_CLOEXEC", 0)
        )
        try:
            self.fd: int | None = os.open(path, flags, 0o644)
        except OSError as e:
            if fsio.is_no_space(e):
                raise fsio.no_space(path, e) from None
            raise UserError(f"{path}: cannot open for appending: {e.strerror}") from None

    def write(self, record: dict[str, Any]) -> None:
        data = memoryview((json.dumps(record) + "\n").encode("utf-8"))
        start = os.fstat(self.fd).st_size
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as e:
            try:
                os.ftruncate(self.fd, start)  # no half record: a resume would have to drop it
            except OSError:
                pass
            if fsio.is_no_space(e):
                raise fsio.no_space(self.path, e) from None
            raise

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass


class Reporter:
    """Rank 0's view of training: progress on the terminal, one JSON line per logged step."""

    def __init__(self, run_dir: Path, is_root: bool, logger: logging.Logger, total_steps: int, t0: float):
        self.run_dir, self.is_root, self.logger, self.t0 = run_dir, is_root, logger, t0
        self._metrics: MetricsFile | None = None
        self._bar = None
        self.history: list[dict[str, Any]] = []
        if is_root:
            self._metrics = MetricsFile(run_dir / METRICS)
            # A progress bar only where a person watches; logs and CI get plain lines instead of \r updates.
            if os.environ.get("HPCAI_TTY", "1" if sys.stderr.isatty() else "0") == "1":
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total_steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True
                )

    def say(self, msg: str) -> None:
        """A line on rank 0's terminal (and in every rank's log)."""
        self.logger.info(msg)
        if self.is_root:
            if self._bar is not None:
                self._bar.write(msg, file=sys.stdout)
            else:
                print(msg, flush=True)

    def step(self, record: dict[str, Any], advance: int) -> None:
        self.logger.info(json.dumps(record))
        if not self.is_root:
            return
        self.history.append(record)
        self._metrics.write(record)
        if self._bar is not None:
            self._bar.update(advance)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
        else:
            print(
                f"step {record['step']} epoch {record['epoch']} loss {record['loss']:.4f} "
                f"lr {record['lr']:.4g} {record['samples_per_s']:.0f} samples/s",
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._metrics is not None:
            self._metrics.close()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a temporary name unique to this writer, then rename): readers never see half
    a file, two writers never share a temporary, a full disk is :class:`fsio.NoSpaceError`."""
    fsio.atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _metrics_lines(path: Path, warn: Callable[[str], None] | None) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every record of ``path``; see :func:`read_metrics`."""
    lines = path.read_bytes().split(b"\n")
    numbered = [(i, raw) for i, raw in enumerate(lines, start=1) if raw.strip()]
    out = []
    for i, raw in numbered:
        why = ""
        try:
            text = raw.decode("utf-8")
            record = json.loads(text)
            if not isinstance(record, dict):
                why = "not a JSON object"
            elif type(record.get("step")) is not int:
                why = "no integer 'step'"
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            why = f"not valid JSON ({e.msg if isinstance(e, json.JSONDecodeError) else 'not UTF-8'})"
        if not why:
            out.append((text, record))
        elif i == numbered[-1][0]:  # the last line: a write cut off by a full disk or a kill
            if warn is not None:
                warn(f"warning: {path}: line {i} is cut off ({why}): dropped it")
        else:
            raise UserError(
                f"{path}: line {i}: {why}; repair or delete that line (a resumed run rewrites the records "
                "after its checkpoint)"
            )
    return out


def read_metrics(path: Path, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, blank lines skipped.

    A last line that does not parse as a record (torn by a full disk or a kill) is dropped, with a warning
    through ``warn``; a bad line anywhere else raises :class:`UserError` naming the file and the line.
    """
    return [record for _, record in _metrics_lines(path, warn)]


def truncate_metrics(run_dir: Path, keep_through: int, warn: Callable[[str], None]) -> None:
    """Drop ``RUN_DIR/metrics.jsonl``'s records after step ``keep_through`` (a resumed run writes them again).

    A torn last line is dropped with a warning, a garbled line elsewhere is a :class:`UserError` naming its
    number (the file is then left as it is); the rewrite is atomic (:func:`fsio.atomic_write_text`) and
    happens only when something is dropped.
    """
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    lines = path.read_bytes()
    kept = [text for text, record in _metrics_lines(path, warn) if record["step"] <= keep_through]
    text = "".join(line + "\n" for line in kept)
    if text.encode("utf-8") != lines:
        fsio.atomic_write_text(path, text)


def plot_loss(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """PNG of the training loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], marker=".", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    fsio.atomic_write_bytes(path, png.getvalue())  # never a half-written PNG, a full disk in one line


def versions() -> dict[str, str]:
    """Library versions for summary.json and checkpoints (the MPI library's too when MPI is running)."""
    import platform

    import h5py
    import numpy as np
    import torch

    from hpcai import __version__

    out = {
        "hpcai": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
    }
    if "mpi4py.MPI" in sys.modules:
        out["mpi"] = sys.modules["mpi4py.MPI"].Get_library_version().splitlines()[0].strip()
    return out


def write_run_outputs(run_dir: Path, summary: dict[str, Any], title: str) -> None:
    """Rank 0's last words: summary.json, and loss.png drawn from the whole metrics.jsonl."""
    write_json(run_dir / "summary.json", summary)
    plot_loss(read_metrics(run_dir / METRICS), run_dir / "loss.png", title)


def elapsed(t0: float) -> float:
    return time.time() - t0
