"""Pipeline schedules: the order in which one stage runs the forwards and backwards of m micro-batches.

A schedule only calls ``stage.forward(i)`` and ``stage.backward(i)``; receiving the input, sending the output,
the loss and the recompute/offload options live in the stage (``pipeline_parallel.Stage``), the bytes on the
wire in ``pipeline_comm``. Both schedules flush: every backward of the step is done before the optimizer
steps, so the gradients are exactly those of the whole batch.

Idle time per stage (equal stages, free communication) is ``(S-1)/(m+S-1)`` of the step for both; they differ
in memory: GPipe holds all m micro-batches' activations at its peak, 1F1B at most ``S - s`` on stage s.
"""

from __future__ import annotations

from typing import Protocol


class StageRunner(Protocol):
    stage: int
    stages: int

    def forward(self, mb: int) -> None: ...
    def backward(self, mb: int) -> None: ...


def train_step_gpipe(stage: StageRunner, micro_batches: int) -> None:
    """GPipe: all forwards, then all backwards (here in reverse, so the last forward's backward starts
    at once on the last stage and its activations are freed first)."""
    for i in range(micro_batches):
        stage.forward(i)
    for i in reversed(range(micro_batches)):
        stage.backward(i)


def train_step_1f1b(stage: StageRunner, micro_batches: int) -> None:
    """1F1B (PipeDream-flush): warm up with ``S - s - 1`` forwards, then alternate one forward and one
    backward, then drain the remaining backwards. Stage s never holds more than ``S - s`` micro-batches."""
    warmup = min(stage.stages - stage.stage - 1, micro_batches)
    for i in range(warmup):
        stage.forward(i)
    for i in range(micro_batches - warmup):  # steady state: forward i + warmup, then backward i
        stage.forward(i + warmup)
        stage.backward(i)
    for i in range(micro_batches - warmup, micro_batches):
        stage.backward(i)


SCHEDULES = {"gpipe": train_step_gpipe, "1f1b": train_step_1f1b}
