"""What a pipeline rank did and when: spans, the measured bubble, a Chrome/Perfetto trace and a PNG. No MPI.

Every rank records spans (kind, micro-batch, start, end) on one clock that starts at a barrier, so the ranks'
timelines line up to within the barrier's skew. Bubble: per rank, the part of the pipeline's step time (the
first stage's ``step`` spans: from its first forward to its last backward) not spent in forward or backward;
``bubble_fraction`` is its mean over the ranks (from the second step on: the first allocates buffers), to
compare with ``(S-1)/(m+S-1)`` for equal stages and free communication (see ``pipeline_bubble``).
Open the trace at https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

KINDS = ("forward", "backward", "send", "recv", "allreduce", "step")
FORWARD, BACKWARD, SEND, RECV, ALLREDUCE, STEP = range(len(KINDS))
COLORS = {"forward": "tab:blue", "backward": "tab:green", "send": "tab:orange", "recv": "tab:red"}
COLORS |= {"allreduce": "tab:purple", "idle": "0.85"}


class Timeline:
    """This rank's spans and per-kind totals; ``span(kind, mb)`` is a context manager."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.spans: list[tuple[int, int, float, float]] = []
        self.totals = np.zeros(len(KINDS))

    def reset_clock(self) -> None:
        """Call right after a barrier: all ranks' time 0 is (nearly) the same instant."""
        self.t0 = time.perf_counter()

    def add(self, kind: int, mb: int, start: float, end: float) -> None:
        self.spans.append((kind, mb, start - self.t0, end - self.t0))
        self.totals[kind] += end - start

    def span(self, kind: int, mb: int = -1) -> _Span:
        return _Span(self, kind, mb)

    def as_array(self) -> np.ndarray:
        """(n, 4) float64: kind, micro-batch, start s, end s (what is gathered to rank 0)."""
        return np.asarray(self.spans, dtype=np.float64).reshape(-1, 4)

    def stats(self) -> dict[str, float]:
        t = dict(zip(KINDS, self.totals.tolist(), strict=True))
        compute = t["forward"] + t["backward"]
        return {
            "compute_s": compute,
            "recv_wait_s": t["recv"],
            "send_s": t["send"],
            "allreduce_s": t["allreduce"],
            "schedule_s": t["step"],
            "bubble_fraction": 1.0 - compute / t["step"] if t["step"] > 0 else float("nan"),
        }


class _Span:
    __slots__ = ("tl", "kind", "mb", "start")

    def __init__(self, tl: Timeline, kind: int, mb: int):
        self.tl, self.kind, self.mb = tl, kind, mb

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.tl.add(self.kind, self.mb, self.start, time.perf_counter())


def bubble_theory(stages: int, micro_batches: int) -> float:
    return (stages - 1) / (micro_batches + stages - 1)


def pipeline_bubble(per_rank: list[dict]) -> None:
    """Set each rank's ``bubble_fraction`` against its pipeline's step time, as the formula counts it.

    A step of the pipeline lasts from the first stage's first forward to its last backward: the first stage
    starts at once and finishes last, so its schedule time is the step's. A later stage's own schedule time
    misses part of its idle time (the wait for the first activation overlaps its optimizer step), which made
    its bubble look smaller than the schedule's: S=2, m=4 read 0.15 against a theory of 0.20 here.
    ``bubble_own_window`` keeps the per-rank figure. Rows need stage, replica, compute_s and schedule_s.
    """
    first = {r["replica"]: r["schedule_s"] for r in per_rank if r["stage"] == 0}
    for r in per_rank:
        r["bubble_own_window"] = r["bubble_fraction"]
        window = first.get(r["replica"], 0.0)
        r["bubble_fraction"] = max(0.0, 1.0 - r["compute_s"] / window) if window > 0 else float("nan")


def idle_spans(spans: np.ndarray) -> list[tuple[float, float]]:
    """Gaps inside each step span not covered by forward, backward, send, recv or all-reduce spans."""
    steps = spans[spans[:, 0] == STEP]
    work = spans[(spans[:, 0] != STEP)]
    work = work[np.argsort(work[:, 2])]
    out = []
    for _, _, s0, s1 in steps:
        inside = work[(work[:, 2] >= s0) & (work[:, 3] <= s1)]
        cursor = s0
        for _, _, a, b in inside:
            if a > cursor:
                out.append((cursor, a))
            cursor = max(cursor, b)
        if s1 > cursor:
            out.append((cursor, s1))
    return out


def write_trace(path: Path, per_rank: list[np.ndarray], labels: list[str]) -> None:
    """Chrome trace-event JSON: one thread per rank; recv spans are the waits (idle waiting for data)."""
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "hpcai pipeline"}}]
    for rank, (spans, label) in enumerate(zip(per_rank, labels, strict=True)):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": label}})
        events.append(
            {"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}}
        )
        rows = [(KINDS[int(k)], int(mb), a, b) for k, mb, a, b in spans if int(k) != STEP]
        rows += [("idle", -1, a, b) for a, b in idle_spans(spans)]
        for kind, mb, a, b in rows:
            name = kind if mb < 0 else f"{kind} {mb}"
            events.append(
                {
                    "name": name,
                    "cat": kind,
                    "ph": "X",
                    "ts": a * 1e6,
                    "dur": max(0.0, b - a) * 1e6,
                    "pid": 0,
                    "tid": rank,
                    "args": {"micro_batch": mb},
                }
            )
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def plot_timeline(path: Path, per_rank: list[np.ndarray], labels: list[str], last_steps: int = 3) -> None:
    """PNG of the last ``last_steps`` steps: one row per rank, forward/backward numbered by micro-batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = sorted({round(s[2], 9) for s in per_rank[0] if int(s[0]) == STEP}) if len(per_rank[0]) else []
    t_from = starts[-last_steps] if len(starts) >= last_steps else 0.0
    fig, ax = plt.subplots(figsize=(11, 0.7 * len(per_rank) + 1.2), dpi=110)
    for row, spans in enumerate(per_rank):
        spans = spans[spans[:, 3] >= t_from]
        kinds = [(KINDS[int(k)], int(mb), a, b) for k, mb, a, b in spans if int(k) != STEP]
        kinds += [("idle", -1, a, b) for a, b in idle_spans(spans)]
        for kind, mb, a, b in kinds:
            ax.broken_barh([(a, b - a)], (row - 0.4, 0.8), color=COLORS[kind], lw=0)
            if kind in ("forward", "backward") and b - a > 0:
                ax.text((a + b) / 2, row, str(mb), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(per_rank)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, list(COLORS), ncols=len(COLORS), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title(f"pipeline timeline, last {last_steps} steps")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
