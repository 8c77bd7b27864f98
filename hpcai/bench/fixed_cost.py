"""A model whose blocks take a fixed time per sample: the pipeline's own cost, without the CPU's jitter.

    hpcai bench bubble --compute fixed [--how sleep]      # make_model below is the jobs' model.factory

Why: the bubble formula ``(S-1)/(m+S-1)`` assumes every micro-batch's forward and backward take the same time
on every stage. Real kernels on a shared VM do not (a 1024x1024 matmul here runs 1.4-2.5 ms, and a core's
speed drifts over tens of milliseconds independently of the other core's), and in 1F1B every slow micro-batch
on one stage is a wait on its neighbour. With these blocks the only variable left is what the pipeline itself
adds (receives, sends, Python between them), which is what the bubble measurement is meant to check.

Each block is a small Linear (so the model trains and the activations travel as usual) followed by a delay:
``us_per_sample`` microseconds per row of the micro-batch in forward, twice that in backward (a backward is
about two forwards' work). ``how="spin"`` holds the core like real compute (one rank per core);
``how="sleep"`` gives it up, so more stages than cores can still each run on time (S = 4 on 2 cores).
"""

from __future__ import annotations

import time

import torch
from torch import nn


def _wait(seconds: float, how: str) -> None:
    end = time.perf_counter() + seconds
    if how == "sleep":
        time.sleep(seconds)
        return
    while time.perf_counter() < end:
        pass


class _Delay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, seconds: float, how: str) -> torch.Tensor:
        ctx.seconds, ctx.how = seconds, how
        _wait(seconds, how)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        _wait(2 * ctx.seconds, ctx.how)
        return grad, None, None


class FixedCost(nn.Module):
    """Linear(width, width) + ReLU, then ``us_per_sample`` per row in forward and twice that in backward."""

    def __init__(self, width: int, us_per_sample: float, how: str):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.us_per_sample, self.how = us_per_sample, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.linear(x))
        return _Delay.apply(y, self.us_per_sample * 1e-6 * len(x), self.how)


def make_model(
    input_shape: tuple[int, ...],
    num_classes: int,
    blocks: int = 8,
    width: int = 64,
    us_per_sample: float = 40.0,
    how: str = "spin",
) -> nn.Sequential:
    """``blocks`` equal FixedCost blocks between a flattening input layer and a linear head.

    The input layer and the head are tiny next to a block's delay. Cut at explicit points so every stage gets
    the same number of blocks: the blocks are top-level modules 2 .. blocks+1 (``hpcai bench bubble`` does).
    """
    if how not in ("spin", "sleep"):
        raise ValueError(f"how must be 'spin' or 'sleep', not {how!r}")
    n_in = 1
    for d in input_shape:
        n_in *= d
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(n_in, width)]
    layers += [FixedCost(width, us_per_sample, how) for _ in range(blocks)]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
