"""What ``hpcai bench memory`` and ``hpcai bench bubble`` share: one short pipeline run and its summary.

Each run is ``hpcai run jobs/digits_pipeline.toml -n RANKS`` in its own processes (peak RSS is a per-process
high-water mark, and every cell starts from a cold, equal state), with no checkpoints and one log line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hpcai import resources
from hpcai.errors import UserError


def hidden_list(text: str, flag: str = "--hidden") -> str:
    """``1024x6`` or ``512,512`` -> the TOML list ``[1024, 1024, ...]``."""
    try:
        if "x" in text:
            width, depth = text.split("x")
            widths = [int(width)] * int(depth)
        else:
            widths = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}: expected WIDTHxDEPTH or a comma list of widths, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise UserError(f"{flag}: widths must be positive, got {text!r}")
    return "[" + ", ".join(map(str, widths)) + "]"


def run_pipeline_job(
    run_dir: Path, ranks: int, sets: list[str], batch: int, steps: int, data: str, timeout: float = 900
) -> dict:
    """Run the pipeline job with ``sets`` (``KEY=VALUE`` overrides) on ``ranks`` ranks; its summary.json.

    A failed run raises RuntimeError with the end of its stderr.
    """
    sets = [
        *sets,
        f"train.batch_size={batch}",
        f"train.steps={steps}",
        f"train.log_every={steps}",
        f"data.path={json.dumps(data)}",
        "checkpoint.final=false",
        "checkpoint.every_seconds=0",
    ]
    job = str(resources.example_job("digits_pipeline"))
    cmd = [sys.executable, "-m", "hpcai", "run", job, "-n", str(ranks)]
    cmd += ["--run-dir", str(run_dir), "--resume", "never"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, HPCAI_TTY="0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{run_dir.name} failed:\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())
