"""What a run leaves and shows: per-rank logs, rank 0's progress, metrics.jsonl, summary.json, the plot.

Only rank 0 writes the shared files and the terminal; every rank writes ``logs/rank-<r>.log``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any


def rank_logger(run_dir: Path, rank: int) -> logging.Logger:
    """A logger writing to ``RUN_DIR/logs/rank-<rank>.log`` (appending: a resumed run continues the file)."""
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"hpcai.rank{rank}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    handler = logging.FileHandler(log_dir / f"rank-{rank}.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return logger


class Reporter:
    """Rank 0's view of training: progress on the terminal, one JSON line per logged step."""

    def __init__(self, run_dir: Path, is_root: bool, logger: logging.Logger, total_steps: int, t0: float):
        self.run_dir, self.is_root, self.logger, self.t0 = run_dir, is_root, logger, t0
        self._metrics = None
        self._bar = None
        self.history: list[dict[str, Any]] = []
        if is_root:
            self._metrics = open(run_dir / "metrics.jsonl", "a")
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
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
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
    """Write JSON atomically (temporary file, then rename): readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
    fig.savefig(path)
    plt.close(fig)


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
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    plot_loss(history, run_dir / "loss.png", title)


def elapsed(t0: float) -> float:
    return time.time() - t0
